//! The authenticator through its public face: files, cache, metrics reasons, and the throttle.

use super::*;

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

async fn auth(a: &Authenticator, header: &str, from: Option<IpAddr>) -> Result<String, Denied> {
    a.authenticate(Some(header), from).await
}

fn alice_and_bob() -> (tempfile::TempDir, Authenticator) {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    let tokens = dir.path().join("tokens");
    let entry = passwd_entry("alice", "s3cret").unwrap();
    assert!(entry.starts_with("alice:$argon2id$"), "{entry}");
    std::fs::write(&users, format!("# comment\n{entry}\n")).unwrap();
    std::fs::write(&tokens, "bob:tok-123\n").unwrap();
    let a = Authenticator::new(Some(users), Some(tokens)).unwrap();
    (dir, a)
}

#[tokio::test]
async fn passwd_entries_verify_and_wrong_ones_do_not() {
    let (_dir, a) = alice_and_bob();
    assert_eq!(
        auth(&a, &basic("alice", "s3cret"), None).await,
        Ok("alice".into())
    );
    // Cached the second time, still right.
    assert_eq!(
        auth(&a, &basic("alice", "s3cret"), None).await,
        Ok("alice".into())
    );
    assert_eq!(
        auth(&a, &basic("alice", "wrong"), None).await,
        Err(Denied::WrongPassword)
    );
    assert_eq!(
        auth(&a, &basic("mallory", "s3cret"), None).await,
        Err(Denied::UnknownUser)
    );
    assert_eq!(auth(&a, "Bearer tok-123", None).await, Ok("bob".into()));
    assert_eq!(
        auth(&a, "Bearer tok-124", None).await,
        Err(Denied::UnknownToken)
    );
    assert_eq!(a.authenticate(None, None).await, Err(Denied::Missing));
    assert_eq!(auth(&a, "Basic !!!", None).await, Err(Denied::Malformed));
    assert_eq!(
        auth(&a, "Digest x", None).await,
        Err(Denied::SchemeNotEnabled)
    );
    assert_eq!(a.challenges().len(), 2);
}

#[tokio::test]
async fn an_address_that_keeps_failing_is_answered_without_a_check_but_keeps_what_worked() {
    let (_dir, a) = alice_and_bob();
    let attacker: IpAddr = "192.0.2.66".parse().unwrap();
    let neighbour: IpAddr = "192.0.2.7".parse().unwrap();
    // Alice uploads from the attacker's address (a NAT they share) before the flood.
    assert_eq!(
        auth(&a, &basic("alice", "s3cret"), Some(attacker)).await,
        Ok("alice".into())
    );
    assert_eq!(
        auth(&a, "Bearer tok-123", Some(attacker)).await,
        Ok("bob".into())
    );
    for i in 0..FREE_FAILURES {
        assert_eq!(
            auth(&a, &basic("alice", &format!("guess-{i}")), Some(attacker)).await,
            Err(Denied::WrongPassword)
        );
    }
    assert_eq!(
        auth(&a, "Bearer tok-999", Some(attacker)).await,
        Err(Denied::UnknownToken)
    );
    // Now in its penalty: guesses get no check and no answer about the password.
    let t = Instant::now();
    for guess in ["guess-x", "s3cret-not", "another"] {
        match auth(&a, &basic("alice", guess), Some(attacker)).await {
            Err(Denied::Throttled(d)) => assert!(d <= MAX_PENALTY, "{d:?}"),
            other => panic!("{guess}: {other:?}"),
        }
    }
    assert!(matches!(
        auth(&a, &basic("bob", "builder"), Some(attacker)).await,
        Err(Denied::Throttled(_))
    ));
    assert!(matches!(
        auth(&a, "Bearer tok-124", Some(attacker)).await,
        Err(Denied::Throttled(_))
    ));
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "a throttled answer ran a check: {:?}",
        t.elapsed()
    );
    // What already worked from that address still works; other addresses are not concerned.
    assert_eq!(
        auth(&a, &basic("alice", "s3cret"), Some(attacker)).await,
        Ok("alice".into())
    );
    assert_eq!(
        auth(&a, "Bearer tok-123", Some(attacker)).await,
        Ok("bob".into())
    );
    assert_eq!(
        auth(&a, &basic("alice", "s3cret"), Some(neighbour)).await,
        Ok("alice".into())
    );
    assert_eq!(
        auth(&a, &basic("alice", "wrong"), Some(neighbour)).await,
        Err(Denied::WrongPassword)
    );
    // A packet another member forwarded (no address) is never throttled.
    assert_eq!(
        a.authenticate(Some(&basic("alice", "wrong")), None).await,
        Err(Denied::WrongPassword)
    );
}

#[test]
fn refusals_for_now_say_when_to_retry() {
    assert_eq!(
        Denied::Throttled(Duration::from_secs(4)).retry_after(),
        Some(Duration::from_secs(4))
    );
    assert_eq!(Denied::Busy.retry_after(), Some(Duration::from_secs(1)));
    assert_eq!(Denied::WrongPassword.retry_after(), None);
    assert_eq!(Denied::Missing.retry_after(), None);
}

#[test]
fn metric_reasons_are_fixed_words_that_do_not_tell_users_apart() {
    let all = [
        Denied::Missing,
        Denied::Malformed,
        Denied::UnknownUser,
        Denied::WrongPassword,
        Denied::UnknownToken,
        Denied::SchemeNotEnabled,
        Denied::Throttled(Duration::from_secs(1)),
        Denied::Busy,
    ];
    for d in &all {
        assert!(
            AUTH_FAILURE_REASONS.contains(&d.metric_reason()),
            "{d:?} -> {} is not pre-registered",
            d.metric_reason()
        );
    }
    // An unknown user looks exactly like a known user with a wrong password.
    assert_eq!(Denied::UnknownUser.metric_reason(), "wrong");
    assert_eq!(Denied::WrongPassword.metric_reason(), "wrong");
    assert_eq!(Denied::UnknownToken.metric_reason(), "wrong");
    assert_eq!(Denied::Missing.metric_reason(), "missing");
    assert_eq!(
        Denied::Throttled(Duration::from_secs(9)).metric_reason(),
        "throttled"
    );
    let distinct: std::collections::HashSet<_> = all.iter().map(Denied::metric_reason).collect();
    assert_eq!(distinct.len(), AUTH_FAILURE_REASONS.len());
}

#[test]
fn bad_files_are_refused_and_names_checked() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(&users, "alice:plaintext\n").unwrap();
    assert!(Authenticator::new(Some(users), None).is_err());
    assert!(passwd_entry("a:b", "x").is_err());
    assert!(passwd_entry("a", "").is_err());
}
