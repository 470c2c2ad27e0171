use std::sync::Arc;

use super::*;

fn key(i: u64) -> Key {
    Key::of("disk-test", &i.to_le_bytes())
}

fn value(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i as usize).wrapping_mul(31).wrapping_add(j) as u8).collect()
}

/// Checks the index's own invariants: positions, totals, budget.
fn assert_consistent(tier: &DiskTier) {
    let index = tier.lock_index();
    assert_eq!(index.map.len(), index.keys.len());
    for (i, k) in index.keys.iter().enumerate() {
        assert_eq!(index.map[k].pos, i);
    }
    assert_eq!(index.total, index.map.values().map(|s| s.bytes).sum::<u64>());
    assert!(index.total <= tier.budget());
}

/// What the files under `dir` really occupy on disk.
fn disk_usage(dir: &Path) -> u64 {
    let mut sum = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let meta = e.metadata().unwrap();
        sum += if meta.is_dir() { disk_usage(&e.path()) } else { meta.blocks() * 512 };
    }
    sum
}

fn count_files(dir: &Path) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| if e.file_type().unwrap().is_dir() { count_files(&e.path()) } else { 1 })
        .sum()
}

#[test]
fn roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(tier.get(&key(1)).unwrap(), None);
    tier.put(&key(1), &value(1, 2048)).unwrap();
    assert_eq!(tier.get(&key(1)).unwrap(), Some(value(1, 2048)));
    tier.put(&key(2), b"").unwrap();
    assert_eq!(tier.get(&key(2)).unwrap(), Some(Vec::new()));
    assert_eq!(tier.entries(), 2);
    assert_eq!(tier.bytes(), 2 * BLOCK);
    assert_eq!(tier.budget(), 1 << 20);
    assert_consistent(&tier);
}

#[test]
fn replace_keeps_one_entry_and_accounts_the_new_size() {
    let dir = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
    tier.put(&key(1), &value(1, 100)).unwrap();
    tier.put(&key(1), &value(2, 10_000)).unwrap();
    assert_eq!(tier.get(&key(1)).unwrap(), Some(value(2, 10_000)));
    assert_eq!(tier.entries(), 1);
    assert_eq!(tier.bytes(), accounted((HEADER_LEN + 10_000) as u64));
    assert_consistent(&tier);
}

#[test]
fn survives_reopen_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
    for i in 0..50 {
        tier.put(&key(i), &value(i, 100 + i as usize * 90)).unwrap();
    }
    let (entries, bytes) = (tier.entries(), tier.bytes());
    drop(tier);

    let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(tier.recover().unwrap(), Recovered { entries, bytes, removed: 0, corrupt: 0 });
    assert_eq!((tier.entries(), tier.bytes()), (entries, bytes));
    for i in 0..50 {
        assert_eq!(tier.get(&key(i)).unwrap(), Some(value(i, 100 + i as usize * 90)));
    }
    assert_consistent(&tier);
}

#[test]
fn recover_evicts_down_to_a_smaller_budget() {
    let dir = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(dir.path(), 100 * BLOCK).unwrap();
    for i in 0..100 {
        tier.put(&key(i), &value(i, 1000)).unwrap();
    }
    drop(tier);
    let tier = DiskTier::open(dir.path(), 40 * BLOCK).unwrap();
    let r = tier.recover().unwrap();
    assert_eq!(r, Recovered { entries: 40, bytes: 40 * BLOCK, removed: 60, corrupt: 0 });
    assert_eq!(count_files(dir.path()), 40);
    assert_consistent(&tier);
}

#[test]
fn get_works_before_recover_and_indexes_the_hit() {
    let dir = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
    tier.put(&key(7), &value(7, 500)).unwrap();
    drop(tier);
    let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(tier.entries(), 0);
    assert_eq!(tier.get(&key(7)).unwrap(), Some(value(7, 500)));
    assert_eq!((tier.entries(), tier.bytes()), (1, BLOCK));
    // A later recover does not count it twice.
    assert_eq!(tier.recover().unwrap(), Recovered { entries: 1, bytes: BLOCK, removed: 0, corrupt: 0 });
}

#[test]
fn corrupt_entries_are_deleted_and_then_miss() {
    type Mutate = fn(&mut Vec<u8>);
    let cases: &[(&str, Mutate)] = &[
        ("truncate to 0", |v| v.clear()),
        ("truncate to 3", |v| v.truncate(3)),
        ("truncate by 1", |v| {
            v.pop();
        }),
        ("flip magic", |v| v[1] ^= 0x40),
        ("flip version", |v| v[4] ^= 1),
        ("flip key", |v| v[KEY_AT + 5] ^= 1),
        ("flip length", |v| v[LEN_AT] ^= 1),
        ("flip checksum", |v| v[SUM_AT + 3] ^= 0x80),
        ("flip payload", |v| v[HEADER_LEN + 10] ^= 1),
        ("append a byte", |v| v.push(0)),
    ];
    let dir = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
    for (i, (name, mutate)) in cases.iter().enumerate() {
        let k = key(i as u64);
        tier.put(&k, &value(i as u64, 100)).unwrap();
        let path = tier.path_of(&k);
        let mut bytes = fs::read(&path).unwrap();
        mutate(&mut bytes);
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(tier.get(&k), Err(DiskError::Corrupt { .. })), "{name}");
        assert!(!path.exists(), "{name}: file still there");
        assert_eq!(tier.get(&k).unwrap(), None, "{name}");
    }
    assert_eq!(tier.entries(), 0);

    // Every single-byte flip anywhere in a file is caught.
    let (k, v) = (key(100), value(100, 64));
    for at in 0..HEADER_LEN + v.len() {
        tier.put(&k, &v).unwrap();
        let path = tier.path_of(&k);
        let mut bytes = fs::read(&path).unwrap();
        bytes[at] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(tier.get(&k), Err(DiskError::Corrupt { .. })), "flip at {at}");
        assert!(!path.exists());
    }

    // A valid file under another key's name.
    tier.put(&key(200), &value(200, 100)).unwrap();
    fs::create_dir_all(tier.path_of(&key(201)).parent().unwrap()).unwrap();
    fs::copy(tier.path_of(&key(200)), tier.path_of(&key(201))).unwrap();
    let err = tier.get(&key(201)).unwrap_err();
    assert!(matches!(err, DiskError::Corrupt { reason: "holds another key", .. }), "{err}");
    assert!(!tier.path_of(&key(201)).exists());
    assert_eq!(tier.get(&key(201)).unwrap(), None);
    assert_eq!(tier.get(&key(200)).unwrap(), Some(value(200, 100)));
    assert_consistent(&tier);
}

#[test]
fn budget_is_never_exceeded_on_disk_or_in_the_accounting() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 1 << 20;
    let tier = DiskTier::open(dir.path(), budget).unwrap();
    for i in 0..2000 {
        tier.put(&key(i), &value(i, 5000)).unwrap();
        assert!(tier.bytes() <= budget);
        if i % 50 == 0 {
            assert!(disk_usage(dir.path()) <= budget, "after put {i}");
        }
    }
    // 5060-byte files take two blocks each.
    assert_eq!(tier.entries(), budget / (2 * BLOCK));
    assert!(disk_usage(dir.path()) <= budget);
    assert_eq!(count_files(dir.path()) as u64, tier.entries());
    assert_consistent(&tier);
}

#[test]
fn frequently_read_entries_survive_a_stream_of_cold_ones() {
    let dir = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(dir.path(), 100 * BLOCK).unwrap();
    for i in 0..20 {
        tier.put(&key(i), &value(i, 1000)).unwrap();
    }
    for _ in 0..10 {
        for i in 0..20 {
            assert!(tier.get(&key(i)).unwrap().is_some());
        }
    }
    for i in 1000..1500 {
        tier.put(&key(i), &value(i, 1000)).unwrap();
    }
    let hot = (0..20).filter(|&i| tier.get(&key(i)).unwrap().is_some()).count();
    assert!(hot >= 18, "only {hot} of 20 hot entries survived");
    assert_eq!(tier.entries(), 100);
}

#[test]
fn aging_lets_formerly_hot_entries_leave() {
    let mut index = Index::new(42);
    for i in 0..10 {
        index.admit(key(i), BLOCK, 10 * BLOCK);
    }
    for _ in 0..5 {
        index.touch_or_admit(key(0), BLOCK, 10 * BLOCK);
    }
    let hot = index.map[&key(0)].freq;
    // Enough later traffic on other keys halves the old counter repeatedly.
    for round in 0..1000 {
        index.touch_or_admit(key(1 + round % 9), BLOCK, 10 * BLOCK);
    }
    assert!(index.map[&key(0)].freq < hot / 2, "{} vs {hot}", index.map[&key(0)].freq);
}

#[test]
fn recover_removes_leftover_tmp_files_and_bad_names() {
    let dir = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
    tier.put(&key(1), &value(1, 100)).unwrap();
    let good = tier.path_of(&key(1));
    let shard = good.parent().unwrap().to_path_buf();
    fs::write(dir.path().join(TMP_DIR).join("123-dead-0"), b"half").unwrap();
    fs::write(shard.join("not-a-key"), b"x").unwrap();
    fs::write(shard.join(key(1).hex().to_uppercase()), b"x").unwrap();
    // A valid name in the wrong shard.
    let other = key(2).hex();
    let wrong_shard = if &other[..2] == "00" { "01" } else { "00" };
    fs::create_dir_all(dir.path().join(wrong_shard)).unwrap();
    fs::write(dir.path().join(wrong_shard).join(&other), b"x").unwrap();
    fs::write(dir.path().join("stray"), b"x").unwrap();
    // A correctly named file too short to be an entry.
    fs::create_dir_all(tier.path_of(&key(3)).parent().unwrap()).unwrap();
    fs::write(tier.path_of(&key(3)), b"x").unwrap();
    drop(tier);

    let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
    let r = tier.recover().unwrap();
    assert_eq!(r, Recovered { entries: 1, bytes: BLOCK, removed: 6, corrupt: 1 });
    assert_eq!(count_files(dir.path()), 1);
    assert!(good.exists());
    assert_eq!(tier.get(&key(1)).unwrap(), Some(value(1, 100)));
}

#[test]
fn values_larger_than_the_budget_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(dir.path(), 2 * BLOCK).unwrap();
    let err = tier.put(&key(1), &vec![0; 2 * BLOCK as usize]).unwrap_err();
    assert!(matches!(err, DiskError::TooLarge { bytes, budget } if bytes == 3 * BLOCK && budget == 2 * BLOCK));
    tier.put(&key(1), &vec![0; 2 * BLOCK as usize - HEADER_LEN]).unwrap();
    assert_eq!(tier.bytes(), 2 * BLOCK);
    assert_eq!(count_files(dir.path()), 1);
}

#[test]
fn clear_removes_every_entry_indexed_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
    for i in 0..10 {
        tier.put(&key(i), &value(i, 100)).unwrap();
    }
    drop(tier);
    let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
    tier.put(&key(10), &value(10, 100)).unwrap();
    assert_eq!(tier.clear().unwrap(), 11);
    assert_eq!((tier.entries(), tier.bytes()), (0, 0));
    assert_eq!(count_files(dir.path()), 0);
    assert_eq!(tier.get(&key(3)).unwrap(), None);
}

#[test]
fn concurrent_put_get_clear_keep_the_accounting_right() {
    let dir = tempfile::tempdir().unwrap();
    let tier = Arc::new(DiskTier::open(dir.path(), 24 * BLOCK).unwrap());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let tier = Arc::clone(&tier);
            std::thread::spawn(move || {
                let mut rng = t * 7919 + 1;
                for _ in 0..1000 {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    // Few keys, so puts of the same key race; sizes vary so replacements change the total.
                    let k = rng % 40;
                    match (rng >> 8) % 200 {
                        0 => {
                            tier.clear().unwrap();
                        }
                        1..100 => tier.put(&key(k), &vec![k as u8; ((rng >> 16) % 9000) as usize]).unwrap(),
                        _ => {
                            if let Some(v) = tier.get(&key(k)).unwrap() {
                                assert!(v.iter().all(|&b| b == k as u8));
                            }
                        }
                    }
                    assert!(tier.bytes() <= tier.budget());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_consistent(&tier);
    // A get drops index entries whose file a racing clear deleted; a recover indexes files whose
    // entry a racing clear dropped. After both, index and files agree exactly.
    for k in 0..40 {
        tier.get(&key(k)).unwrap();
    }
    tier.recover().unwrap();
    assert_consistent(&tier);
    assert_eq!(count_files(dir.path()) as u64, tier.entries());
}
