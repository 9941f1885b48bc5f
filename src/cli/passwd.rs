//! `bitsfarm passwd USER`: the users-file line for USER.

use std::io::{BufRead, IsTerminal};

use anyhow::{Context, bail};

use crate::server::auth;

/// Prints `USER:$argon2id$...` on stdout and nothing else there, so that `>> users` is safe. The
/// password comes from the terminal when stdin is one (asked twice, without echo, as `passwd`
/// and `htpasswd` do: a typo would otherwise lock the user out), else from stdin's first line
/// (scripts, and pipes from a secret store).
pub fn passwd(user: &str) -> anyhow::Result<()> {
    // Before the prompt: a bad name would otherwise be told only after the password was typed.
    auth::check_user_name(user).map_err(anyhow::Error::msg)?;
    let password = if std::io::stdin().is_terminal() {
        ask_twice(user)?
    } else {
        first_line()?
    };
    let entry = auth::passwd_entry(user, &password).map_err(anyhow::Error::msg)?;
    println!("{entry}");
    Ok(())
}

/// The prompts go to the terminal itself (rpassword writes to `/dev/tty`), never to stdout.
fn ask_twice(user: &str) -> anyhow::Result<String> {
    let ask = |prompt: String| {
        rpassword::prompt_password(prompt).context("reading the password from the terminal")
    };
    let first = ask(format!("Password for {user}: "))?;
    if first.is_empty() {
        bail!("the password must not be empty; nothing was printed");
    }
    let second = ask(format!("Password for {user}, again: "))?;
    if first != second {
        bail!("the two passwords do not match; nothing was printed");
    }
    Ok(first)
}

fn first_line() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin (its first line)")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}
