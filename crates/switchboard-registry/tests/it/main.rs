//! Registry behaviour under many users and namespaces, and under concurrent writers.

mod model;

use std::collections::BTreeSet;
use std::sync::Arc;

use switchboard_registry::{ConnId, Registry, Target};

fn ids(reg: &Registry<u32>, t: Target<'_>) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    reg.for_each(t, |_, h| {
        out.insert(*h);
    });
    out
}

#[test]
fn targets_select_exactly_their_sockets() {
    let reg = Registry::new();
    // handle = index; (user, ns)
    let population = [
        ("alex", Some("a")),
        ("alex", Some("a")),
        ("alex", Some("b")),
        ("alex", None),
        ("sam", Some("a")),
        ("kim", Some("b")),
    ];
    for (i, (u, ns)) in population.iter().enumerate() {
        reg.insert(u, *ns, i as u32);
    }
    assert_eq!(
        ids(&reg, Target::UserInNamespace("alex", "a")),
        [0, 1].into()
    );
    assert_eq!(ids(&reg, Target::User("alex")), [0, 1, 2, 3].into());
    assert_eq!(ids(&reg, Target::Namespace("a")), [0, 1, 4].into());
    assert_eq!(ids(&reg, Target::Namespace("b")), [2, 5].into());
    assert_eq!(ids(&reg, Target::All), (0..6).collect());
    assert_eq!(ids(&reg, Target::User("nobody")), BTreeSet::new());
    assert_eq!(
        ids(&reg, Target::UserInNamespace("sam", "b")),
        BTreeSet::new()
    );
    let users: Vec<String> = reg
        .users_in_namespace("a")
        .iter()
        .map(|u| u.to_string())
        .collect();
    assert_eq!(users, ["alex", "sam"]);
}

#[test]
fn ids_are_unique_and_entries_readable() {
    let reg = Registry::new();
    let a = reg.insert("u", Some("n"), 7u32);
    let b = reg.insert("u", Some("n"), 8u32);
    assert_ne!(a, b);
    let e = reg.get(a).unwrap();
    assert_eq!(&*e.username, "u");
    assert_eq!(e.namespace.as_deref(), Some("n"));
    assert_eq!(e.handle, 7);
    assert!(reg.get(ConnId(999_999)).is_none());
}

#[test]
fn concurrent_inserts_and_removes_leave_consistent_indices() {
    let reg = Arc::new(Registry::<u32>::new());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let reg = reg.clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..2000u32 {
                    let user = format!("u{}", i % 17);
                    let ns = format!("n{}", i % 5);
                    mine.push(reg.insert(&user, Some(&ns), t * 10_000 + i));
                }
                // remove every other one
                for id in mine.iter().step_by(2) {
                    assert!(reg.remove(*id).is_some());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(reg.len(), 4 * 1000);
    let by_ns: usize = (0..5)
        .map(|n| reg.count(Target::Namespace(&format!("n{n}"))))
        .sum();
    assert_eq!(by_ns, 4000);
    let by_user: usize = (0..17)
        .map(|u| reg.count(Target::User(&format!("u{u}"))))
        .sum();
    assert_eq!(by_user, 4000);
}
