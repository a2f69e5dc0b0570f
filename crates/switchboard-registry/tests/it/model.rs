//! Model test: random insert / remove / query sequences on a [`Registry`], compared after
//! every step with a naive list of live connections. Small alphabets, so users and
//! namespaces collide often and indices are emptied and refilled.

use std::collections::BTreeSet;

use proptest::prelude::*;
use switchboard_registry::{ConnId, Registry, Target};

const USERS: &[&str] = &["alex", "sam", "kim", "lee"];
const NAMESPACES: &[&str] = &["a", "b", "c"];

#[derive(Debug, Clone)]
enum Op {
    /// Insert (user index, namespace index or none).
    Insert(usize, Option<usize>),
    /// Remove the live connection at this index (modulo the number live); a no-op when
    /// none is live, except that removing an already removed id is tried then.
    Remove(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..USERS.len(), proptest::option::of(0..NAMESPACES.len()))
            .prop_map(|(u, n)| Op::Insert(u, n)),
        2 => any::<usize>().prop_map(Op::Remove),
    ]
}

/// One live connection as the model sees it: (id, user, namespace, handle).
type Row = (ConnId, &'static str, Option<&'static str>, u32);

fn visited(reg: &Registry<u32>, t: Target<'_>) -> Vec<(ConnId, u32)> {
    let mut out = Vec::new();
    reg.for_each(t, |id, h| out.push((id, *h)));
    out.sort();
    // `collect_in_order`: the same connections, in the order of their ids; asked again with
    // nothing changed (the list of everyone is then the one kept), the same.
    for _ in 0..2 {
        assert_eq!(
            &*reg.collect_in_order(t),
            &out[..],
            "collect_in_order({t:?})"
        );
    }
    out
}

fn expected(model: &[Row], keep: impl Fn(&Row) -> bool) -> Vec<(ConnId, u32)> {
    let mut out: Vec<_> = model
        .iter()
        .filter(|r| keep(r))
        .map(|r| (r.0, r.3))
        .collect();
    out.sort();
    out
}

/// Every query the registry answers, against the model.
fn check(reg: &Registry<u32>, model: &[Row]) -> Result<(), TestCaseError> {
    let all = expected(model, |_| true);
    prop_assert_eq!(visited(reg, Target::All), all.clone());
    prop_assert_eq!(reg.count(Target::All), all.len());
    prop_assert_eq!(reg.len(), model.len());
    prop_assert_eq!(reg.is_empty(), model.is_empty());
    for &u in USERS {
        let want = expected(model, |r| r.1 == u);
        prop_assert_eq!(visited(reg, Target::User(u)), want.clone(), "User({})", u);
        prop_assert_eq!(reg.count(Target::User(u)), want.len(), "count User({})", u);
        for &n in NAMESPACES {
            let want = expected(model, |r| r.1 == u && r.2 == Some(n));
            let t = Target::UserInNamespace(u, n);
            prop_assert_eq!(visited(reg, t), want.clone(), "{:?}", t);
            prop_assert_eq!(reg.count(t), want.len(), "count {:?}", t);
        }
    }
    for &n in NAMESPACES {
        let want = expected(model, |r| r.2 == Some(n));
        prop_assert_eq!(visited(reg, Target::Namespace(n)), want.clone(), "ns {}", n);
        prop_assert_eq!(
            reg.count(Target::Namespace(n)),
            want.len(),
            "count ns {}",
            n
        );
        let users: BTreeSet<&str> = model
            .iter()
            .filter(|r| r.2 == Some(n))
            .map(|r| r.1)
            .collect();
        let got: Vec<String> = reg
            .users_in_namespace(n)
            .iter()
            .map(|u| u.to_string())
            .collect();
        let want: Vec<String> = users.into_iter().map(String::from).collect();
        prop_assert_eq!(got, want, "users_in_namespace({})", n);
    }
    // Names outside the alphabet, and the empty namespace, select nothing.
    prop_assert_eq!(reg.count(Target::User("nobody")), 0);
    prop_assert_eq!(reg.count(Target::Namespace("")), 0);
    prop_assert!(visited(reg, Target::Namespace("")).is_empty());
    for r in model {
        let e = reg.get(r.0);
        prop_assert!(e.is_some(), "get({}) of a live id", r.0);
        let e = e.unwrap();
        prop_assert_eq!(&*e.username, r.1);
        prop_assert_eq!(e.namespace.as_deref(), r.2);
        prop_assert_eq!(e.handle, r.3);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn registry_matches_a_naive_model(ops in proptest::collection::vec(op(), 1..60)) {
        let reg = Registry::<u32>::new();
        let mut model: Vec<Row> = Vec::new();
        let mut removed: Vec<ConnId> = Vec::new();
        for (step, op) in ops.into_iter().enumerate() {
            let handle = step as u32;
            match op {
                Op::Insert(u, n) => {
                    let (user, ns) = (USERS[u], n.map(|n| NAMESPACES[n]));
                    let id = reg.insert(user, ns, handle);
                    prop_assert!(
                        model.iter().all(|r| r.0 != id) && !removed.contains(&id),
                        "id {} reused", id
                    );
                    model.push((id, user, ns, handle));
                }
                Op::Remove(i) if !model.is_empty() => {
                    let row = model.remove(i % model.len());
                    let e = reg.remove(row.0);
                    prop_assert!(e.is_some(), "remove({}) of a live id", row.0);
                    let e = e.unwrap();
                    prop_assert_eq!((&*e.username, e.namespace.as_deref(), e.handle),
                                    (row.1, row.2, row.3));
                    removed.push(row.0);
                }
                Op::Remove(i) => {
                    // Nothing live: removing a dead id must change nothing.
                    if let Some(&dead) = removed.get(i % removed.len().max(1)) {
                        prop_assert!(reg.remove(dead).is_none(), "second remove({})", dead);
                        prop_assert!(reg.get(dead).is_none());
                    }
                }
            }
            check(&reg, &model)?;
        }
        for dead in removed {
            prop_assert!(reg.get(dead).is_none(), "get({}) after remove", dead);
        }
    }
}
