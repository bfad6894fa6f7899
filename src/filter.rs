//! Which paths matter: the extension filter and the exclude globs.
//!
//! Applied to paths *below* the watched directory only, component by
//! component, so an excluded name anywhere on the way (`@eaDir/x.flac`,
//! `.sync/x.flac`) hides the file, while the watched directory's own location
//! (which may itself contain dots) never does.

use std::collections::HashSet;
use std::path::Path;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

#[derive(Debug, Clone)]
pub struct Filter {
    /// Lower-case extensions without the dot; `None` takes every file (`*`).
    extensions: Option<HashSet<String>>,
    exclude: GlobSet,
}

#[derive(Debug)]
pub enum FilterError {
    Extensions(String),
    Exclude(String),
}

impl Filter {
    pub fn new(extensions: &str, exclude: &str) -> Result<Filter, FilterError> {
        let extensions = if extensions.trim() == "*" {
            None
        } else {
            let set: HashSet<String> = extensions
                .split(',')
                .map(|extension| extension.trim().trim_start_matches('.').to_lowercase())
                .filter(|extension| !extension.is_empty())
                .collect();
            if set.is_empty() {
                return Err(FilterError::Extensions(
                    "expected a comma-separated list of extensions, or *".into(),
                ));
            }
            Some(set)
        };
        let mut builder = GlobSetBuilder::new();
        for pattern in exclude.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let glob = GlobBuilder::new(pattern)
                .case_insensitive(true)
                .literal_separator(true)
                .build()
                .map_err(|error| FilterError::Exclude(format!("pattern {pattern:?}: {error}")))?;
            builder.add(glob);
        }
        let exclude = builder
            .build()
            .map_err(|error| FilterError::Exclude(error.to_string()))?;
        Ok(Filter { extensions, exclude })
    }

    /// True when a component name is excluded (`.x.flac.AbC123`, `@eaDir`).
    pub fn excludes_name(&self, name: &str) -> bool {
        self.exclude.is_match(name)
    }

    /// True when `relative` (a path below the watched directory) or any of
    /// its parent components is excluded.
    pub fn excludes(&self, relative: &Path) -> bool {
        relative
            .components()
            .any(|component| self.excludes_name(&component.as_os_str().to_string_lossy()))
    }

    /// True when a file at `relative` is one we announce.
    pub fn announces(&self, relative: &Path) -> bool {
        if self.excludes(relative) {
            return false;
        }
        match &self.extensions {
            None => true,
            Some(extensions) => relative
                .extension()
                .and_then(|extension| extension.to_str())
                .is_some_and(|extension| extensions.contains(&extension.to_lowercase())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS};

    fn default_filter() -> Filter {
        Filter::new(DEFAULT_EXTENSIONS, DEFAULT_EXCLUDE).unwrap()
    }

    #[test]
    fn extensions_are_case_insensitive() {
        let filter = default_filter();
        assert!(filter.announces(Path::new("a/Song.FLAC")));
        assert!(filter.announces(Path::new("b.mp3")));
        assert!(!filter.announces(Path::new("cover.jpg")));
        assert!(!filter.announces(Path::new("flac")));
    }

    #[test]
    fn temporary_and_nas_names_are_excluded() {
        let filter = default_filter();
        for path in [
            "x.flac.part",
            ".x.flac.AbC123",
            "@eaDir/x.flac",
            "a/@eaDir/SYNOFILE_THUMB.flac",
            "#recycle/x.flac",
            ".Trash-1000/files/x.flac",
            "a/.DS_Store",
            ".~lock.x.flac#",
            "x.flac.tmp",
            "x.flac.crdownload",
            "X.FLAC.PART",
        ] {
            assert!(!filter.announces(Path::new(path)), "{path} must be excluded");
        }
        assert!(filter.announces(Path::new("Artist/Album (2020)/01. Track.flac")));
    }

    #[test]
    fn star_takes_every_file_but_still_excludes() {
        let filter = Filter::new("*", "*.part").unwrap();
        assert!(filter.announces(Path::new("notes.txt")));
        assert!(filter.announces(Path::new("README")));
        assert!(!filter.announces(Path::new("x.part")));
    }

    #[test]
    fn bad_patterns_and_empty_lists_are_errors() {
        assert!(matches!(Filter::new("", ""), Err(FilterError::Extensions(_))));
        assert!(matches!(Filter::new("flac", "a[b"), Err(FilterError::Exclude(_))));
    }
}
