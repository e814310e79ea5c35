//! `ternmq::security` costs, without sockets: the per-message Read check of an
//! `acl::Authorizer` (and the rarer Subscribe check) on a rule set of a typical size, and
//! what verifying a password costs for each kind of hash.
//!
//!     cargo bench --bench security

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::time::Duration;
use ternmq::security::acl::{Access, Acl, Client};
use ternmq::security::password::{NewHash, PasswordFile};

/// A user with 20 topic rules and a deny, plus two patterns: a device's view of a site.
const ACL: &str = "\
user u
topic deny site/secret/#
topic read site/0/+/temp
topic read site/1/+/temp
topic read site/2/+/temp
topic read site/3/+/temp
topic read site/4/+/temp
topic read site/5/+/temp
topic read site/6/+/temp
topic read site/7/+/temp
topic read site/8/+/temp
topic read site/9/+/temp
topic read site/10/+/temp
topic read site/11/+/temp
topic read site/12/+/temp
topic read site/13/+/temp
topic read site/14/+/temp
topic read site/15/+/temp
topic read site/16/+/temp
topic read site/17/+/temp
topic read site/18/+/temp
topic read site/19/+/temp
topic subscribe site/#
pattern read devices/%c/#
pattern write devices/%c/out
";

fn read_check(c: &mut Criterion) {
    let acl = Acl::parse(ACL).expect("valid acl");
    let who = Client {
        username: Some("u"),
        client_id: "dev7",
    };
    let auth = acl.authorizer(&who, None);
    let mut group = c.benchmark_group("acl");
    // Denied by the first rule.
    group.bench_function("read/deny-first", |b| {
        b.iter(|| auth.check(black_box("site/secret/x/temp"), Access::Read))
    });
    // Allowed by the first grant.
    group.bench_function("read/first-grant", |b| {
        b.iter(|| auth.check(black_box("site/0/d1/temp"), Access::Read))
    });
    // Allowed by the last rule (a pattern): every rule is tried.
    group.bench_function("read/last-rule", |b| {
        b.iter(|| auth.check(black_box("devices/dev7/x/y"), Access::Read))
    });
    // Refused after trying every rule.
    group.bench_function("read/no-match", |b| {
        b.iter(|| auth.check(black_box("other/topic/name"), Access::Read))
    });
    group.bench_function("subscribe", |b| {
        b.iter(|| auth.check(black_box("site/3/+/temp"), Access::Subscribe))
    });
    // What CONNECT pays once: resolving the client's rules.
    group.bench_function("authorizer-at-connect", |b| {
        b.iter(|| acl.authorizer(black_box(&who), None))
    });
    group.finish();
}

/// One verification per kind of line: mosquitto's `$6$` and `$7$` (101 iterations, what
/// mosquitto_passwd writes), argon2id and SCRAM-SHA-256 as `ternmq passwd` writes them.
fn password_verify(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("ternmq-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let path = dir.join("passwd");
    let mut file = PasswordFile::empty().expect("random numbers");
    file.set("argon", b"pw", NewHash::Argon2id).expect("hash");
    file.set("scram", b"pw", NewHash::ScramSha256)
        .expect("hash");
    let mut text = file.to_text();
    // mosquitto_passwd 2.0.11 output, password "secret" / "x".
    text.push_str("m7:$7$101$7kIDB0Vzox9gBkl+$kYDUQg6/45CaSJauwV0uNLF88v/nPWlIwFyiAjNSumCxvYHPj0AdeDqUTfmxMll3YLJD9QRaS978Rgow1vpLfA==\n");
    text.push_str("m6:$6$N6JbSmKAcviL8sdx$fpM28Av+NllhAy2C4YXY6xBF8IiJm2itGNRvmv/PQpnI38aD3KvnlE9WtPReTg14NnVtNDk8Qzzrl8uu0PNVFw==\n");
    std::fs::write(&path, text).expect("write the file");
    let file = PasswordFile::load(&path).expect("load");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(file.verify("argon", b"pw") && file.verify("scram", b"pw"));
    assert!(file.verify("m7", b"secret") && file.verify("m6", b"x"));

    let mut group = c.benchmark_group("password");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3));
    for user in ["m6", "m7", "scram", "argon"] {
        group.bench_function(user, |b| b.iter(|| file.verify(black_box(user), b"wrong")));
    }
    group.finish();
}

criterion_group!(benches, read_check, password_verify);
criterion_main!(benches);
