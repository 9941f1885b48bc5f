//! The job file: what a later run needs to resume an upload, like a BITS job.

use std::path::Path;

use reqwest::Url;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobFile {
    pub url: String,
    pub size: u64,
    pub mtime: u64,
    pub session_id: String,
    pub target: String,
    pub host_id: Option<String>,
    pub fallback_timeout_s: Option<u64>,
    pub offset: u64,
}

pub fn mtime_secs(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl JobFile {
    /// The same upload: same URL, and the file unchanged (BITS fails a job whose file changed).
    pub fn matches(&self, url: &Url, size: u64, mtime: u64) -> bool {
        self.url == url.as_str() && self.size == size && self.mtime == mtime
    }

    pub fn load(path: &Path) -> Option<JobFile> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Best effort, written atomically: a lost job file only costs a restart from zero.
    pub fn save(&self, path: &Path) {
        let Ok(json) = serde_json::to_vec_pretty(self) else {
            return;
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }

    pub fn remove(path: &Path) {
        let _ = std::fs::remove_file(path);
    }
}
