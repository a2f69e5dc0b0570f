use std::path::{Path, PathBuf};

/// Why a config could not be loaded. The message names the key and, where the YAML parser
/// knows it, the line and column.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The text is not valid YAML, or does not fit the schema.
    #[error("{}{message}", file.as_ref().map(|f| format!("{}: ", f.display())).unwrap_or_default())]
    Invalid {
        /// The file, when loaded from one.
        file: Option<PathBuf>,
        /// What is wrong, with the key path and position, as the YAML parser words it
        /// (`gateway.socket: unknown field `pth`, expected one of ... at line 3 column 5`).
        message: String,
        /// 1-based line of the offending key or value, when known.
        line: Option<usize>,
        /// 1-based column, when known.
        column: Option<usize>,
    },
}

impl ConfigError {
    pub(crate) fn from_yaml(e: serde_yaml::Error) -> Self {
        let loc = e.location();
        ConfigError::Invalid {
            file: None,
            message: e.to_string(),
            line: loc.as_ref().map(|l| l.line()),
            column: loc.as_ref().map(|l| l.column()),
        }
    }

    /// A check's error placed at `line` (when known), which the message ends by naming, as
    /// the parser's own messages do.
    pub(crate) fn at_line(message: String, line: Option<usize>) -> Self {
        ConfigError::Invalid {
            file: None,
            message: match line {
                Some(l) => format!("{message} at line {l}"),
                None => message,
            },
            line,
            column: None,
        }
    }

    pub(crate) fn in_file(self, path: &Path) -> Self {
        match self {
            ConfigError::Invalid {
                message,
                line,
                column,
                ..
            } => ConfigError::Invalid {
                file: Some(path.to_path_buf()),
                message,
                line,
                column,
            },
            other => other,
        }
    }

    /// 1-based line of the error, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { line, .. } => *line,
            ConfigError::Read { .. } => None,
        }
    }

    /// 1-based column of the error, when known.
    pub fn column(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { column, .. } => *column,
            ConfigError::Read { .. } => None,
        }
    }
}
