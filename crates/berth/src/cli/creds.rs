//! The file `berth login` writes: the server's URL and a token, in the
//! user's config directory (`$XDG_CONFIG_HOME/berth/config.toml`, else
//! `~/.config/berth/config.toml`), readable by its owner alone (0600).

use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Failure;

/// What the file holds.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// The file's path, if the user has a config directory.
pub fn path() -> Option<PathBuf> {
    let dir = match std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").filter(|h| !h.is_empty())?).join(".config"),
    };
    Some(dir.join("berth").join("config.toml"))
}

impl Credentials {
    /// The saved credentials; none when no file was written.
    pub fn load() -> Result<Option<Credentials>, Failure> {
        let Some(path) = path() else {
            return Ok(None);
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Failure::local(
                    "config_unreadable",
                    format!("cannot read {}: {e}", path.display()),
                ));
            }
        };
        toml::from_str(&text).map(Some).map_err(|e| {
            Failure::local(
                "config_unreadable",
                format!(
                    "{} is not a berth login file ({}); run `berth login` again",
                    path.display(),
                    e.message()
                ),
            )
        })
    }

    /// Writes the file, created 0600 (and made so if it existed), and
    /// returns its path.
    pub fn save(&self) -> Result<PathBuf, Failure> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let path = path().ok_or_else(|| {
            Failure::local(
                "no_config_dir",
                "neither XDG_CONFIG_HOME nor HOME is set: nowhere to save the login",
            )
        })?;
        let fail = |what: &str, e: std::io::Error| {
            Failure::local(
                "config_unwritable",
                format!("cannot {what} {}: {e}", path.display()),
            )
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| fail("create the directory of", e))?;
        }
        let text = toml::to_string(self).map_err(|e| {
            Failure::local("config_unwritable", format!("cannot encode the login: {e}"))
        })?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| fail("write", e))?;
        // `mode` applies only to a new file: an older one may be wider.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| fail("restrict", e))?;
        f.write_all(text.as_bytes()).map_err(|e| fail("write", e))?;
        Ok(path)
    }
}
