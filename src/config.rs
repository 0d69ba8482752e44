//! idem.toml and the environment, typed and validated.
//!
//! Layers, later wins: built-in defaults, the config file, `IDEM__SECTION__KEY`
//! environment variables, and `DATABASE_URL`.

use std::path::{Path, PathBuf};

use crate::connector::{self, ConfigIssue, ConfigIssues, Connector};
pub use crate::schema::settings::*;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {message}")]
    File { file: String, message: String },
    #[error(transparent)]
    Issues(#[from] ConfigIssues),
    #[error("no database configured: set DATABASE_URL or database_url in the config file")]
    NoDatabase,
}

impl Settings {
    /// Loads `path` (which must exist when given explicitly), else `./idem.toml` if present.
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        let default = Path::new("idem.toml");
        let file = match path {
            Some(path) => Some(path.to_path_buf()),
            None => default.exists().then(|| default.to_path_buf()),
        };
        let mut builder = config::Config::builder();
        if let Some(file) = &file {
            if !file.exists() {
                return Err(ConfigError::File {
                    file: file.display().to_string(),
                    message: "no such file".into(),
                });
            }
            builder = builder
                .add_source(config::File::from(file.as_path()).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("IDEM")
                .prefix_separator("__")
                .separator("__"),
        );
        let shown = file
            .as_ref()
            .map_or_else(|| "environment".to_string(), |f| f.display().to_string());
        let mut settings: Settings =
            builder
                .build()
                .and_then(|c| c.try_deserialize())
                .map_err(|err| ConfigError::File {
                    file: shown,
                    message: err.to_string(),
                })?;
        if let Ok(url) = std::env::var("DATABASE_URL") {
            settings.database_url = Some(url);
        }
        settings.base_dir = file
            .as_ref()
            .and_then(|f| f.parent())
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        settings.file = file;
        Ok(settings)
    }

    /// The database URL, with `${ENV}` references resolved.
    pub fn database_url(&self) -> Result<String, ConfigError> {
        let raw = self
            .database_url
            .as_deref()
            .ok_or(ConfigError::NoDatabase)?;
        let resolved = crate::secret::resolve(raw);
        if let Ok(url) = &resolved {
            // Its password (in `user:password@` or `?password=`) is masked in every error.
            crate::redact::register_url(url);
        }
        resolved.map_err(|err| ConfigError::File {
            file: self
                .file
                .as_ref()
                .map_or_else(|| "environment".into(), |f| f.display().to_string()),
            message: format!("database_url: {err}"),
        })
    }

    /// The connector files this configuration names.
    pub fn connector_files(&self) -> Result<Vec<PathBuf>, ConfigError> {
        if !self.connectors.is_empty() {
            return Ok(self
                .connectors
                .iter()
                .map(|p| self.base_dir.join(p))
                .collect());
        }
        let dir = self.base_dir.join("connectors");
        let entries = std::fs::read_dir(&dir).map_err(|err| ConfigError::File {
            file: dir.display().to_string(),
            message: format!(
                "cannot list connector files: {err} (list them under 'connectors' in idem.toml)"
            ),
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        Ok(files)
    }

    /// Loads and validates every connector, collecting every problem of every file.
    pub fn load_connectors(&self) -> Result<Vec<Connector>, ConfigError> {
        let mut connectors = Vec::new();
        let mut issues = Vec::new();
        for file in self.connector_files()? {
            match connector::load_file(&file) {
                Ok(connector) => connectors.push(connector),
                Err(ConfigIssues(found)) => issues.extend(found),
            }
        }
        for connector in &mut connectors {
            issues.extend(self.override_partitions(connector));
        }
        let mut names = std::collections::BTreeMap::new();
        for connector in &connectors {
            if let Some(other) =
                names.insert(connector.spec.source_system.clone(), connector.file.clone())
            {
                issues.push(ConfigIssue {
                    file: connector.file.clone(),
                    stream: None,
                    field: Some("source_system".into()),
                    message: format!(
                        "'{}' is also the source_system of {}",
                        connector.spec.source_system,
                        other.display()
                    ),
                });
            }
        }
        if !issues.is_empty() {
            return Err(ConfigIssues(issues).into());
        }
        Ok(connectors)
    }

    /// Applies `[partitions.<source_system>]` to `connector`: only streams that are
    /// partitioned in their connector file may be overridden, and the new list passes the
    /// same checks.
    fn override_partitions(&self, connector: &mut Connector) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        let Some(overrides) = self.partitions.get(&connector.spec.source_system) else {
            return issues;
        };
        let file = self
            .file
            .clone()
            .unwrap_or_else(|| PathBuf::from("idem.toml"));
        for (stream_name, values) in overrides {
            let field = Some(format!(
                "partitions.{}.{stream_name}",
                connector.spec.source_system
            ));
            let Some(stream) = connector.spec.streams.get_mut(stream_name) else {
                issues.push(ConfigIssue {
                    file: file.clone(),
                    stream: Some(stream_name.clone()),
                    field,
                    message: format!(
                        "{} has no stream '{stream_name}'",
                        connector.spec.source_system
                    ),
                });
                continue;
            };
            let Some(partitions) = stream.partitions.as_mut() else {
                issues.push(ConfigIssue {
                    file: file.clone(),
                    stream: Some(stream_name.clone()),
                    field,
                    message: "the stream has no [partitions] in its connector file to override"
                        .into(),
                });
                continue;
            };
            partitions.values = values.clone();
            for (_, message) in crate::connector::partition::check(stream, Some(values)) {
                issues.push(ConfigIssue {
                    file: file.clone(),
                    stream: Some(stream_name.clone()),
                    field: field.clone(),
                    message,
                });
            }
        }
        issues
    }
}
