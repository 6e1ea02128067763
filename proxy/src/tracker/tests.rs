use super::*;

#[test]
fn a_hidden_query_is_answered_to_nobody_but_its_parameter_status() {
    let mut t = Tracker::default();
    t.push(Pending::HiddenQuery);
    t.client_message(b'Q');
    let (fwd, _) = reply(
        &mut t,
        &[
            (b'C', b"SET\0"),
            (b'S', b"TimeZone\0UTC\0"),
            (b'Z', b"I"),
            (b'T', b""),
            (b'C', b"SELECT 1\0"),
            (b'Z', b"I"),
        ],
    );
    assert_eq!(fwd, vec![false, true, false, true, true, true]);
    assert!(t.is_free());
}

#[test]
fn what_passes_unaccounted_is_exactly_what_accounting_would_forward_untouched() {
    let states: Vec<Vec<Pending>> = vec![
        vec![],
        vec![Pending::Query],
        vec![Pending::HiddenQuery, Pending::Query],
        vec![Pending::Describe, Pending::Sync],
        vec![
            Pending::Parse {
                hidden: true,
                stmt: Some("s1".into()),
            },
            Pending::Bind,
            Pending::Execute,
            Pending::Sync,
        ],
        vec![
            Pending::Close { hidden: true },
            Pending::Fake(b'1'),
            Pending::Sync,
        ],
    ];
    let mut passing = 0;
    for queue in states {
        let mut t = Tracker::default();
        for p in queue {
            t.push(p);
        }
        for tag in 0..=255u8 {
            if !t.passes(tag) {
                continue;
            }
            passing += 1;
            let mut after = t.clone();
            let mut fakes = Vec::new();
            let v = after.server_message(tag, b"I", &mut fakes);
            assert!(
                v.forward && v.unprepared.is_empty() && fakes.is_empty(),
                "{}",
                tag as char
            );
            assert_eq!(after, t, "{} changed the accounting", tag as char);
        }
    }
    assert!(passing > 20, "the fast path covers rows and notices");
}

#[test]
fn what_settles_quickly_is_exactly_what_accounting_would_forward_alone() {
    let parse = |hidden: bool| Pending::Parse {
        hidden,
        stmt: hidden.then(|| "s1".to_owned()),
    };
    let states: Vec<Vec<Pending>> = vec![
        vec![],
        vec![Pending::Query],
        vec![
            parse(false),
            Pending::Bind,
            Pending::Describe,
            Pending::Execute,
            Pending::Sync,
        ],
        vec![
            Pending::Bind,
            Pending::Describe,
            Pending::Execute,
            Pending::Sync,
        ],
        vec![Pending::Describe, Pending::Execute, Pending::Sync],
        vec![Pending::Execute, Pending::Sync],
        vec![Pending::Close { hidden: false }, Pending::Sync],
        vec![parse(true), Pending::Bind, Pending::Sync],
        vec![Pending::Close { hidden: true }, parse(true), Pending::Sync],
        vec![Pending::Bind, Pending::Fake(b'1'), Pending::Sync],
        vec![Pending::HiddenQuery, Pending::Query],
    ];
    let mut settled = 0;
    for queue in states {
        let mut t = Tracker::default();
        for p in queue.clone() {
            t.push(p);
        }
        for tag in 0..=255u8 {
            let mut quick = t.clone();
            if !quick.settles(tag) {
                assert_eq!(quick, t, "{} changed the accounting", tag as char);
                continue;
            }
            settled += 1;
            let mut general = t.clone();
            let mut fakes = Vec::new();
            let v = general.server_message(tag, b"", &mut fakes);
            let tag = tag as char;
            assert!(
                v.forward && v.unprepared.is_empty() && fakes.is_empty(),
                "{tag}"
            );
            assert_eq!(quick, general, "{tag} after {queue:?}");
        }
    }
    assert_eq!(
        settled, 8,
        "1, 2, 3, n and T, C s and I, each at its request"
    );
}

#[test]
fn the_last_ready_fast_path_accounts_exactly_as_the_general_one() {
    let states: Vec<Vec<Pending>> = vec![
        vec![],
        vec![Pending::Query],
        vec![Pending::Sync],
        vec![Pending::HiddenQuery],
        vec![Pending::HiddenQuery, Pending::Query],
        vec![Pending::Query, Pending::Query],
        vec![Pending::Bind, Pending::Sync],
        vec![Pending::Bind, Pending::Fake(b'3'), Pending::Sync],
    ];
    let mut taken = 0;
    for queue in states {
        for body in [&b"I"[..], b"T", b"E", b"", b"IX"] {
            let mut t = Tracker::default();
            for p in queue.clone() {
                t.push(p);
            }
            let mut general = t.clone();
            let mut fakes = Vec::new();
            let v = general.server_message(b'Z', body, &mut fakes);
            let Some(status) = t.last_ready(body) else {
                continue;
            };
            taken += 1;
            assert!(v.forward && v.unprepared.is_empty() && fakes.is_empty());
            assert_eq!(t, general, "{queue:?} {body:?}");
            assert_eq!(Some(status), body.first().copied());
        }
    }
    assert_eq!(taken, 6, "a lone Query or Sync, with each valid status");
}

fn reply(t: &mut Tracker, msgs: &[(u8, &[u8])]) -> (Vec<bool>, Vec<u8>) {
    let mut fakes = Vec::new();
    let fwd = msgs
        .iter()
        .map(|(tag, body)| {
            let v = t.server_message(*tag, body, &mut fakes).forward;
            let queued = t.queue.iter().filter(|p| matches!(p, Pending::Fake(_)));
            assert_eq!(t.fakes, queued.count(), "fake count out of step");
            v
        })
        .collect();
    (fwd, fakes)
}

#[test]
fn simple_query_frees_the_server_only_on_idle_ready() {
    let mut t = Tracker::default();
    t.client_message(b'Q');
    assert!(!t.is_free());
    reply(&mut t, &[(b'T', b""), (b'D', b""), (b'C', b"")]);
    assert!(!t.is_free(), "results are not the end");
    reply(&mut t, &[(b'Z', b"T")]);
    assert!(!t.is_free(), "open transaction keeps the server");
    assert!(t.is_quiet());
    t.client_message(b'Q');
    reply(&mut t, &[(b'E', b""), (b'Z', b"E")]);
    assert_eq!(t.status(), b'E');
    assert!(!t.is_free(), "failed transaction keeps the server");
    t.client_message(b'Q');
    reply(&mut t, &[(b'C', b""), (b'Z', b"I")]);
    assert!(t.is_free());
}

#[test]
fn pipeline_with_several_syncs_is_free_only_after_the_last_ready() {
    let mut t = Tracker::default();
    for tag in [b'P', b'B', b'E', b'S', b'B', b'E', b'S'] {
        t.client_message(tag);
    }
    reply(
        &mut t,
        &[(b'1', b""), (b'2', b""), (b'C', b""), (b'Z', b"I")],
    );
    assert!(!t.is_free(), "second Sync still outstanding");
    reply(&mut t, &[(b'2', b""), (b'C', b""), (b'Z', b"I")]);
    assert!(t.is_free());
}

#[test]
fn flush_without_sync_keeps_the_client_attached() {
    let mut t = Tracker::default();
    for tag in [b'P', b'D', b'H'] {
        t.client_message(tag);
    }
    reply(&mut t, &[(b'1', b""), (b't', b""), (b'T', b"")]);
    assert!(t.is_quiet() || !t.is_free());
    assert!(!t.is_free(), "no Sync yet: implicit transaction open");
    t.client_message(b'S');
    reply(&mut t, &[(b'Z', b"I")]);
    assert!(t.is_free());
}

#[test]
fn error_mid_pipeline_skips_to_the_next_sync_and_forgets_failed_parses() {
    let mut t = Tracker::default();
    t.push(Pending::Parse {
        hidden: false,
        stmt: Some("a".into()),
    });
    t.push(Pending::Parse {
        hidden: true,
        stmt: Some("b".into()),
    });
    t.client_message(b'B');
    t.client_message(b'E');
    t.client_message(b'S');
    t.client_message(b'B');
    t.client_message(b'S');
    let mut fakes = Vec::new();
    let v = t.server_message(b'E', b"", &mut fakes);
    assert!(v.forward);
    assert_eq!(v.unprepared, vec!["a".to_string(), "b".to_string()]);
    reply(&mut t, &[(b'Z', b"I")]);
    assert!(!t.is_free());
    reply(&mut t, &[(b'2', b""), (b'Z', b"I")]);
    assert!(t.is_free());
}

#[test]
fn hidden_parse_reply_is_not_forwarded_and_fakes_come_in_order() {
    let mut t = Tracker::default();
    assert_eq!(
        t.push(Pending::Fake(b'1')),
        vec![b'1'],
        "nothing ahead: at once"
    );
    t.push(Pending::Parse {
        hidden: true,
        stmt: Some("s".into()),
    });
    t.client_message(b'B');
    assert!(t.push(Pending::Fake(b'3')).is_empty(), "must wait its turn");
    t.client_message(b'S');
    let (fwd, fakes) = reply(&mut t, &[(b'1', b"")]);
    assert_eq!((fwd, fakes), (vec![false], vec![]));
    let (fwd, fakes) = reply(&mut t, &[(b'2', b"")]);
    assert_eq!((fwd, fakes), (vec![true], vec![b'3']));
    reply(&mut t, &[(b'Z', b"I")]);
    assert!(t.is_free());
}

#[test]
fn copy_keeps_the_server_until_ready() {
    let mut t = Tracker::default();
    t.client_message(b'Q');
    reply(&mut t, &[(b'G', b"")]);
    for tag in [b'd', b'd', b'c'] {
        t.client_message(tag);
    }
    assert!(!t.is_free());
    reply(&mut t, &[(b'C', b"")]);
    assert!(!t.is_free());
    reply(&mut t, &[(b'Z', b"I")]);
    assert!(t.is_free());
}

/// Bind, Execute and Sync sent, the server answered BindComplete and
/// CopyInResponse: what tokio-postgres waits for before it streams.
fn extended_copy_begun() -> Tracker {
    let mut t = Tracker::default();
    for tag in [b'B', b'E', b'S'] {
        t.client_message(tag);
    }
    reply(&mut t, &[(b'2', b""), (b'G', b"")]);
    t
}

/// PostgreSQL ignores a Sync that reaches it in copy-in mode: Bind,
/// Execute, Sync, CopyData, CopyDone, Sync get one ReadyForQuery.
#[test]
fn syncs_sent_during_an_extended_copy_are_not_waited_for() {
    let mut t = extended_copy_begun();
    for tag in [b'd', b'S', b'c', b'S'] {
        t.client_message(tag);
    }
    reply(&mut t, &[(b'C', b"")]);
    assert!(!t.is_free());
    reply(&mut t, &[(b'Z', b"I")]);
    assert!(t.is_free(), "{t:?}");
    // All of it pipelined before the server answers.
    let mut t = Tracker::default();
    for tag in [b'B', b'E', b'S', b'd', b'c', b'S'] {
        t.client_message(tag);
    }
    reply(&mut t, &[(b'2', b""), (b'G', b""), (b'C', b"")]);
    assert!(!t.is_free());
    reply(&mut t, &[(b'Z', b"I")]);
    assert!(t.is_free(), "{t:?}");
    // CopyFail: the error, then the Sync after it is answered.
    let mut t = extended_copy_begun();
    for tag in [b'd', b'f', b'S'] {
        t.client_message(tag);
    }
    reply(&mut t, &[(b'E', b"")]);
    assert!(!t.is_free());
    reply(&mut t, &[(b'Z', b"I")]);
    assert!(t.is_free(), "{t:?}");
}

/// The server ends a COPY with an error (a bad row) while the client
/// streams; the COPY that never started (its Execute failed) leaves its
/// CopyDone unanswered too.
#[test]
fn a_copy_the_server_ended_or_never_began_owes_one_ready_per_sync_after_it() {
    let mut t = extended_copy_begun();
    reply(&mut t, &[(b'E', b"")]);
    // The client had not seen the error: the rest, then a Sync.
    for tag in [b'd', b'c', b'S'] {
        t.client_message(tag);
    }
    assert!(!t.is_free());
    reply(&mut t, &[(b'Z', b"I")]);
    assert!(t.is_free(), "{t:?}");
    // The client sends only a Sync after the error: it counts.
    let mut t = extended_copy_begun();
    reply(&mut t, &[(b'E', b"")]);
    t.client_message(b'S');
    assert!(!t.is_free());
    reply(&mut t, &[(b'Z', b"I")]);
    assert!(t.is_free(), "{t:?}");
    // COPY of a missing table, everything pipelined: two Syncs, two
    // ReadyForQuery, the CopyDone between them answered by nothing.
    let mut t = Tracker::default();
    for tag in [b'B', b'E', b'S', b'd', b'c', b'S'] {
        t.client_message(tag);
    }
    reply(&mut t, &[(b'2', b""), (b'E', b""), (b'Z', b"I")]);
    assert!(!t.is_free());
    reply(&mut t, &[(b'Z', b"I")]);
    assert!(t.is_free(), "{t:?}");
    // A stale CopyDone to an idle server adds nothing.
    t.client_message(b'c');
    assert!(t.is_free(), "{t:?}");
}

#[test]
fn notices_and_notifications_change_nothing() {
    let mut t = Tracker::default();
    t.client_message(b'Q');
    let (fwd, _) = reply(&mut t, &[(b'N', b""), (b'A', b""), (b'S', b"")]);
    assert_eq!(fwd, vec![true; 3]);
    assert!(!t.is_free());
}
