//! `ternmq passwd FILE USER [-c] [-D] [--scram]`: adds, updates or deletes a user of a
//! password file, like `mosquitto_passwd`.
//!
//! The password is never taken from the command line: it is asked twice on the terminal
//! without echo, or read as one line from standard input when that is not a terminal
//! (`printf '%s\n' "$PW" | ternmq passwd FILE USER`). New hashes are argon2id, or a
//! SCRAM-SHA-256 verifier with `--scram` (needed for MQTT 5 SCRAM authentication).
//! `-c` creates the file, replacing an existing one (as `mosquitto_passwd -c` does);
//! without it the file must exist. `-D` deletes the user. The rest of the file is kept
//! as it is, and it is written atomically.

use super::password::{NewHash, PasswordError, PasswordFile};
use std::io::BufRead;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdArgs {
    pub file: PathBuf,
    pub user: String,
    /// `-D`: delete the user.
    pub delete: bool,
    /// `--scram`: store a SCRAM-SHA-256 verifier instead of argon2id.
    pub scram: bool,
    /// `-c`: create (or replace) the file.
    pub create: bool,
}

/// Where the password comes from.
pub enum PasswordInput<'a> {
    /// Asked twice on the controlling terminal, without echo.
    Terminal,
    /// One line (without its line ending) from a pipe or file.
    Reader(&'a mut dyn BufRead),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Added,
    Updated,
    Deleted,
}

#[derive(Debug, thiserror::Error)]
pub enum PasswdError {
    #[error(transparent)]
    File(#[from] PasswordError),
    #[error("{} does not exist (-c creates it)", .0.display())]
    NoFile(PathBuf),
    #[error("user `{user}` is not in {}", file.display())]
    NoUser { user: String, file: PathBuf },
    #[error("-c and -D cannot be used together")]
    CreateAndDelete,
    #[error("-D and --scram cannot be used together")]
    DeleteAndScram,
    #[error("the passwords do not match")]
    Mismatch,
    #[error("empty password")]
    Empty,
    #[error("cannot read the password: {0}")]
    Read(std::io::Error),
}

pub fn run(args: &PasswdArgs, input: PasswordInput) -> Result<Outcome, PasswdError> {
    if args.create && args.delete {
        return Err(PasswdError::CreateAndDelete);
    }
    if args.delete && args.scram {
        return Err(PasswdError::DeleteAndScram);
    }
    let mut file = if args.create {
        PasswordFile::empty()?
    } else {
        match PasswordFile::load(&args.file) {
            Err(PasswordError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Err(PasswdError::NoFile(args.file.clone()))
            }
            other => other?,
        }
    };
    let outcome = if args.delete {
        if !file.remove(&args.user) {
            return Err(PasswdError::NoUser {
                user: args.user.clone(),
                file: args.file.clone(),
            });
        }
        Outcome::Deleted
    } else {
        // A bad username fails before the password is asked for.
        super::password::check_username(&args.user)?;
        let outcome = if file.contains(&args.user) {
            Outcome::Updated
        } else {
            Outcome::Added
        };
        let password = read_password(input)?;
        let how = if args.scram {
            NewHash::ScramSha256
        } else {
            NewHash::Argon2id
        };
        file.set(&args.user, password.as_bytes(), how)?;
        outcome
    };
    file.save(&args.file)?;
    Ok(outcome)
}

fn read_password(input: PasswordInput) -> Result<String, PasswdError> {
    let password = match input {
        PasswordInput::Terminal => {
            let first = rpassword::prompt_password("Password: ").map_err(PasswdError::Read)?;
            let second =
                rpassword::prompt_password("Reenter password: ").map_err(PasswdError::Read)?;
            if first != second {
                return Err(PasswdError::Mismatch);
            }
            first
        }
        PasswordInput::Reader(reader) => {
            let mut line = String::new();
            reader.read_line(&mut line).map_err(PasswdError::Read)?;
            let end = line.trim_end_matches(['\n', '\r']).len();
            line.truncate(end);
            line
        }
    };
    if password.is_empty() {
        return Err(PasswdError::Empty);
    }
    Ok(password)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &tempfile::TempDir, user: &str) -> PasswdArgs {
        PasswdArgs {
            file: dir.path().join("pw"),
            user: user.into(),
            delete: false,
            scram: false,
            create: false,
        }
    }

    fn with(line: &str, args: &PasswdArgs) -> Result<Outcome, PasswdError> {
        run(args, PasswordInput::Reader(&mut line.as_bytes()))
    }

    #[test]
    fn create_add_update_delete() {
        let dir = tempfile::tempdir().unwrap();
        let a = args(&dir, "alice");
        assert!(matches!(with("pw1\n", &a), Err(PasswdError::NoFile(_))));
        let create = PasswdArgs {
            create: true,
            ..a.clone()
        };
        assert_eq!(with("pw1\n", &create).unwrap(), Outcome::Added);
        let bob = PasswdArgs {
            scram: true,
            ..args(&dir, "bob")
        };
        assert_eq!(with("pw2\r\n", &bob).unwrap(), Outcome::Added);
        assert_eq!(with("pw3", &a).unwrap(), Outcome::Updated);
        let file = PasswordFile::load(&a.file).unwrap();
        assert!(file.verify("alice", b"pw3") && file.verify("bob", b"pw2"));
        assert!(file.scram("bob").is_some() && file.scram("alice").is_none());

        let delete = PasswdArgs {
            delete: true,
            ..a.clone()
        };
        assert_eq!(with("", &delete).unwrap(), Outcome::Deleted);
        assert!(matches!(with("", &delete), Err(PasswdError::NoUser { .. })));
        let file = PasswordFile::load(&a.file).unwrap();
        assert!(!file.contains("alice") && file.contains("bob"));
    }

    #[test]
    fn refusals_leave_the_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let a = PasswdArgs {
            create: true,
            ..args(&dir, "alice")
        };
        with("pw\n", &a).unwrap();
        let before = std::fs::read(&a.file).unwrap();
        let update = PasswdArgs {
            create: false,
            ..a.clone()
        };
        assert!(matches!(with("\n", &update), Err(PasswdError::Empty)));
        assert!(matches!(with("", &update), Err(PasswdError::Empty)));
        let bad = PasswdArgs {
            user: "a:b".into(),
            ..update.clone()
        };
        assert!(matches!(
            with("x\n", &bad),
            Err(PasswdError::File(PasswordError::BadUsername(_)))
        ));
        let both = PasswdArgs {
            delete: true,
            ..a.clone()
        };
        assert!(matches!(with("", &both), Err(PasswdError::CreateAndDelete)));
        let both = PasswdArgs {
            delete: true,
            scram: true,
            ..update.clone()
        };
        assert!(matches!(with("", &both), Err(PasswdError::DeleteAndScram)));
        assert_eq!(std::fs::read(&a.file).unwrap(), before);
        // A broken file is not rewritten.
        std::fs::write(&a.file, "alice:plain\n").unwrap();
        let err = with("x\n", &update).unwrap_err().to_string();
        assert!(err.contains("pw:1:"), "{err}");
        assert_eq!(std::fs::read(&a.file).unwrap(), b"alice:plain\n");
    }
}
