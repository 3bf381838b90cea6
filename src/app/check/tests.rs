//! Unit tests of the rules: fstab, boot config, default link, `systems/`
//! entries, the report.

use super::bootloader::boot_config_problems;
use super::fstab::fstab_findings;
use super::report::{Finding, Report};
use super::systems::{classify_entry, default_problem, Entry};
use crate::store::layout;
use crate::tree::fstab;
use std::path::Path;

const UUID: &str = "11111111-2222-3333-4444-555555555555";

fn fstab_problems(content: &str, fs_uuid: &str, state_subvols: &[String]) -> Vec<String> {
    fstab_findings(content, fs_uuid, state_subvols, false).0
}

fn all_state() -> Vec<String> {
    layout::STATE_DIRS.iter().map(|s| s.to_string()).collect()
}

fn completed() -> String {
    fstab::complete("# vendor fstab\n", UUID).content
}

#[test]
fn completed_fstab_has_no_problems() {
    assert_eq!(
        fstab_problems(&completed(), UUID, &all_state()),
        Vec::<String>::new()
    );
}

#[test]
fn fstab_missing_root_and_state_entries_are_named() {
    let text = completed()
        .lines()
        .filter(|l| !l.contains(" / ") && !l.contains(" /home "))
        .collect::<Vec<_>>()
        .join("\n");
    let p = fstab_problems(&text, UUID, &all_state());
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p[0].contains("no entry mounts /"), "{p:?}");
    assert!(p[1].contains("/home"), "{p:?}");
}

#[test]
fn fstab_existing_entry_for_a_state_dir_counts() {
    // /srv mounted from another disk: no /state/srv subvolume, no problem.
    let text = fstab::complete("LABEL=data /srv ext4 defaults 0 2\n", UUID).content;
    let state: Vec<String> = ["home", "root", "opt", "var"].map(String::from).to_vec();
    assert!(fstab_problems(&text, UUID, &state).is_empty());
    // An existing entry mounting /home (not from /state) counts too.
    let text = "UUID=x / btrfs defaults 0 1\n/dev/sdb1 /home ext4 defaults 0 2\n";
    let p = fstab_problems(text, "x", &["home".to_string()]);
    assert!(p.is_empty(), "{p:?}");
}

#[test]
fn fstab_entry_for_a_missing_state_subvolume_or_other_uuid() {
    let p = fstab_problems(&completed(), UUID, &["home".into()]);
    assert!(
        p.iter()
            .any(|s| s.contains("/var mounts subvol=/state/var")),
        "{p:?}"
    );
    let p = fstab_problems(&completed(), "other-uuid", &all_state());
    assert!(
        p.iter().any(|s| s.contains("the entry for / names UUID=")),
        "{p:?}"
    );
    assert!(p.iter().any(|s| s.contains("/home")), "{p:?}");
}

#[test]
fn a_kept_root_entry_naming_another_device_is_a_warning_not_a_problem() {
    let text = fstab::complete("UUID=dead-beef / ext4 defaults 0 1\n", UUID).content;
    let (p, w) = fstab_findings(&text, UUID, &all_state(), true);
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(w, fstab::complete(&text, UUID).warnings);
    assert!(w[0].contains("will not mount its own root"), "{w:?}");
    // A `/` line the deploy added itself with another UUID is a problem.
    let (p, w) = fstab_findings(&completed(), "other-uuid", &all_state(), false);
    assert!(
        p.iter().any(|s| s.contains("the entry for / names UUID=")),
        "{p:?}"
    );
    assert!(w.is_empty());
}

fn conf(labels: &[&str], default: &str) -> String {
    let entries: Vec<crate::boot::extlinux::Entry> = labels
        .iter()
        .map(|l| crate::boot::extlinux::Entry {
            label: l.to_string(),
            initramfs: true,
            dtb: false,
            args: crate::boot::extlinux::DEFAULT_KERNEL_ARGS.into(),
            ro: false,
        })
        .collect();
    let main = crate::boot::extlinux::render(UUID, &entries, None).unwrap();
    let d = entries.iter().find(|e| e.label == default).unwrap();
    main.replace(
        &format!("include /systems/default/{}\n", layout::DEFAULT_ENTRY),
        &crate::boot::extlinux::render_default_entry(UUID, d).unwrap(),
    )
}

fn labels(l: &[&str]) -> Vec<String> {
    l.iter().map(|s| s.to_string()).collect()
}

#[test]
fn rendered_config_matches_its_versions() {
    let c = conf(&["factory", "v2"], "v2");
    assert!(boot_config_problems(&c, UUID, &labels(&["factory", "v2"]), None).is_empty());
}

#[test]
fn the_trial_entry_is_checked_against_the_open_trial() {
    let mut t = crate::boot::extlinux::Entry {
        label: "v2".into(),
        initramfs: true,
        dtb: false,
        args: crate::boot::extlinux::DEFAULT_KERNEL_ARGS.into(),
        ro: false,
    };
    t.args = crate::store::trial::entry_args(&t.args, "v2");
    let entries: Vec<_> = ["factory", "v2"]
        .iter()
        .map(|l| crate::boot::extlinux::Entry {
            label: l.to_string(),
            ..t.clone()
        })
        .collect();
    let conf = crate::boot::extlinux::render(UUID, &entries, Some(&t)).unwrap();
    let conf = format!("{conf}\nlabel default\n  kernel /systems/default/kernel\n  append root=UUID={UUID} rootflags=subvol=systems/default/run\n");
    let l = labels(&["factory", "v2"]);
    assert!(
        boot_config_problems(&conf, UUID, &l, Some("v2")).is_empty(),
        "{:?}",
        boot_config_problems(&conf, UUID, &l, Some("v2"))
    );
    assert_eq!(
        boot_config_problems(&conf, UUID, &l, None),
        ["a `label trial` entry, but no trial is open (run deploy cleanup)"]
    );
    assert_eq!(
        boot_config_problems(&conf, UUID, &l, Some("factory")),
        ["entry `label trial` does not boot the version on trial, factory, with btrfs_deploy.trial=factory"]
    );
}

#[test]
fn config_missing_extra_or_duplicate_entries() {
    let c = conf(&["factory"], "factory");
    let p = boot_config_problems(&c, UUID, &labels(&["factory", "v2"]), None);
    assert_eq!(p, ["no `label v2` entry"]);
    let c = conf(&["factory", "v2"], "factory");
    let p = boot_config_problems(&c, UUID, &labels(&["factory"]), None);
    assert_eq!(
        p,
        ["entry `label v2` has no version with a kernel on this disk"]
    );
    let c = format!(
        "{}\n{}",
        conf(&["factory"], "factory"),
        conf(&["factory"], "factory")
    );
    let p = boot_config_problems(&c, UUID, &labels(&["factory"]), None);
    assert!(
        p.contains(&"2 `label default` entries".to_string()),
        "{p:?}"
    );
    assert!(
        p.contains(&"2 `label factory` entries".to_string()),
        "{p:?}"
    );
}

#[test]
fn config_with_wrong_uuid_or_subvolume() {
    let c = conf(&["factory"], "factory");
    let p = boot_config_problems(&c, "other", &labels(&["factory"]), None);
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p.iter().all(|s| s.contains("root=UUID=other")), "{p:?}");
    let c = c.replace("subvol=systems/factory/run", "subvol=systems/x/run");
    let p = boot_config_problems(&c, UUID, &labels(&["factory"]), None);
    assert_eq!(
        p,
        ["entry `label factory` lacks rootflags=subvol=systems/factory/run"]
    );
}

#[test]
fn default_link_rules() {
    let known = ["factory", "v2"];
    let complete = ["factory"];
    assert_eq!(
        default_problem(Path::new("factory"), &known, &complete),
        None
    );
    let p = default_problem(Path::new("v3"), &known, &complete).unwrap();
    assert!(p.contains("dangling"), "{p}");
    let p = default_problem(Path::new("v2"), &known, &complete).unwrap();
    assert!(p.contains("incomplete"), "{p}");
    let p = default_problem(Path::new("/systems/factory"), &known, &complete).unwrap();
    assert!(p.contains("relative"), "{p}");
    let p = default_problem(Path::new("../systems/factory"), &known, &complete).unwrap();
    assert!(p.contains("relative"), "{p}");
}

#[test]
fn systems_entries_are_classified() {
    assert_eq!(classify_entry("factory", true), Entry::Version);
    assert_eq!(classify_entry(".v2.partial", true), Entry::Leftover);
    assert_eq!(classify_entry(".v2.removing", true), Entry::Leftover);
    assert_eq!(classify_entry(".default.tmp", false), Entry::Leftover);
    assert_eq!(classify_entry("stray-file", false), Entry::Unexpected);
    assert_eq!(classify_entry(".hidden", true), Entry::Unexpected);
}

#[test]
fn report_counts_and_text() {
    let r = Report::new(
        Path::new("d.img"),
        vec![
            Finding::ok("a", "fine"),
            Finding::warning("leftovers", "x"),
            Finding::problem("default", "dangling"),
        ],
    );
    assert!(!r.ok);
    assert_eq!((r.problems, r.warnings), (1, 1));
    let t = r.to_text();
    assert!(t.contains("ok      a: fine\n"), "{t}");
    assert!(t.contains("warning leftovers: x\n"), "{t}");
    assert!(t.contains("PROBLEM default: dangling\n"), "{t}");
    let j: serde_json::Value =
        serde_json::from_str(&crate::util::json::to_string(&r).unwrap()).unwrap();
    assert_eq!(j["format"], 1);
    assert_eq!(
        (j["ok"].clone(), j["problems"].clone()),
        (false.into(), 1.into())
    );
    assert_eq!(j["target"], "d.img");
    assert_eq!(j["findings"][2]["status"], "problem");
}
