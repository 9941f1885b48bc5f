//! The job file: what a later run needs to resume an upload, like a BITS job.

use std::path::Path;
use std::time::Duration;

use reqwest::Url;
use serde::{Deserialize, Serialize};

use super::machine::Session;

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
    /// The job of an upload of `url` (a file of `size` bytes modified at `mtime`) that the server
    /// has up to `offset` in session `s`.
    pub fn of(url: &Url, size: u64, mtime: u64, s: &Session, offset: u64) -> JobFile {
        JobFile {
            url: url.to_string(),
            size,
            mtime,
            session_id: s.id.clone(),
            target: s.target.to_string(),
            host_id: s.host_id.clone(),
            fallback_timeout_s: s.fallback_timeout.map(|d| d.as_secs()),
            offset,
        }
    }

    /// The session this job holds; a target that no longer parses sends packets to `url`.
    pub fn session(&self, url: &Url) -> Session {
        Session {
            id: self.session_id.clone(),
            target: Url::parse(&self.target).unwrap_or_else(|_| url.clone()),
            host_id: self.host_id.clone(),
            fallback_timeout: self.fallback_timeout_s.map(Duration::from_secs),
            fallback_started: None,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_keeps_the_session_it_was_made_from() {
        let url = Url::parse("http://shared/up/a.bin").unwrap();
        let s = Session {
            id: "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}".into(),
            target: Url::parse("http://pod-1:8080/up/a.bin").unwrap(),
            host_id: Some("pod-1:8080".into()),
            fallback_timeout: Some(Duration::from_secs(30)),
            fallback_started: None,
        };
        let job = JobFile::of(&url, 10, 7, &s, 4);
        assert!(job.matches(&url, 10, 7));
        assert!(!job.matches(&url, 10, 8));
        assert_eq!(job.offset, 4);
        assert_eq!(job.session(&url), s);
        let broken = JobFile {
            target: "not a url".into(),
            ..job
        };
        assert_eq!(broken.session(&url).target, url);
    }

    #[test]
    fn jobs_are_saved_and_loaded() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("a.bin.bitsjob");
        let url = Url::parse("http://shared/up/a.bin").unwrap();
        let s = Session {
            id: "{A}".into(),
            target: url.clone(),
            host_id: None,
            fallback_timeout: None,
            fallback_started: None,
        };
        let job = JobFile::of(&url, 10, 7, &s, 4);
        job.save(&path);
        assert_eq!(JobFile::load(&path), Some(job));
        JobFile::remove(&path);
        assert_eq!(JobFile::load(&path), None);
    }
}
