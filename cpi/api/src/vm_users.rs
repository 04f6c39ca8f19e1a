//! The system user every VM has, as on BOSH's stemcells: `vcap` (user and
//! group), which release scripts name (`chown vcap:vcap`, `chpst -u
//! vcap:vcap`, monit's `as uid vcap and gid vcap`).
//!
//! This module owns only the text of `/etc/passwd` and `/etc/group` with
//! `vcap` added: the stemcell builder and the local CPI (whose VMs start
//! from the host's `/etc`) write what it returns into the VM's own files.
//! It reads and writes no files itself, and never changes an existing
//! entry.

/// The name of BOSH's system user and group.
pub const VCAP: &str = "vcap";

/// The ids BOSH's stemcells give `vcap`; taken when free.
const PREFERRED_ID: u32 = 1000;

/// The name and id fields of a colon-separated database's lines.
fn entries(text: &str, id_field: usize) -> Vec<(&str, Option<u32>)> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let fields: Vec<&str> = l.split(':').collect();
            let id = fields.get(id_field).and_then(|f| f.parse().ok());
            (fields[0], id)
        })
        .collect()
}

/// `text` with `line` appended (on a line of its own).
fn appended(text: &str, line: &str) -> String {
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(line);
    out.push('\n');
    out
}

/// `passwd` and `group` with a `vcap` user and group added where they lack
/// one: the group gets 1000 (or the first free id above), the user the
/// group's id when that uid is free (else the first free uid from 1000),
/// home `/home/vcap`, shell `/bin/bash`. `None` when both already have it.
pub fn with_vcap(passwd: &str, group: &str) -> Option<(String, String)> {
    let users = entries(passwd, 2);
    let user_gid = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f[0] == VCAP)
        .and_then(|f| f.get(3).and_then(|g| g.parse::<u32>().ok()));
    let groups = entries(group, 2);
    let user = users.iter().find(|(n, _)| *n == VCAP);
    let grp = groups.iter().find(|(n, _)| *n == VCAP);
    if user.is_some() && grp.is_some() {
        return None;
    }
    let uid_taken = |id: u32| users.iter().any(|(_, u)| *u == Some(id));
    let gid_taken = |id: u32| groups.iter().any(|(_, g)| *g == Some(id));
    let first_free = |taken: &dyn Fn(u32) -> bool, from: u32| (from..).find(|&id| !taken(id));
    let gid = match (grp, user_gid) {
        (Some((_, Some(g))), _) => *g,
        (None, Some(g)) if !gid_taken(g) => g,
        _ => first_free(&|id| gid_taken(id) || uid_taken(id), PREFERRED_ID)
            .or_else(|| first_free(&gid_taken, PREFERRED_ID))?,
    };
    let mut out_group = group.to_string();
    if grp.is_none() {
        out_group = appended(group, &format!("{VCAP}:x:{gid}:"));
    }
    let mut out_passwd = passwd.to_string();
    if user.is_none() {
        let uid = if uid_taken(gid) {
            first_free(&uid_taken, PREFERRED_ID)?
        } else {
            gid
        };
        out_passwd = appended(
            passwd,
            &format!("{VCAP}:x:{uid}:{gid}:BOSH System User:/home/{VCAP}:/bin/bash"),
        );
    }
    Some((out_passwd, out_group))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcap_gets_1000_when_free_and_the_files_keep_what_they_had() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/:/usr/sbin/nologin";
        let group = "root:x:0:\n";
        let (p, g) = with_vcap(passwd, group).expect("added");
        assert_eq!(
            p,
            format!("{passwd}\nvcap:x:1000:1000:BOSH System User:/home/vcap:/bin/bash\n")
        );
        assert_eq!(g, "root:x:0:\nvcap:x:1000:\n");
        assert_eq!(with_vcap(&p, &g), None, "already there: nothing changes");
    }

    #[test]
    fn taken_ids_are_skipped_and_an_existing_group_is_used() {
        let passwd = "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        let group = "root:x:0:\nalice:x:1000:\nstaff:x:1001:\n";
        let (p, g) = with_vcap(passwd, group).expect("added");
        assert!(
            p.ends_with("vcap:x:1002:1002:BOSH System User:/home/vcap:/bin/bash\n"),
            "{p}"
        );
        assert!(g.ends_with("vcap:x:1002:\n"), "{g}");
        // The group exists (gid 1001 is taken as a gid but its uid is free).
        let group = "root:x:0:\nvcap:x:1001:\n";
        let (p, g) = with_vcap(passwd, group).expect("user added");
        assert!(
            p.ends_with("vcap:x:1001:1001:BOSH System User:/home/vcap:/bin/bash\n"),
            "{p}"
        );
        assert_eq!(g, group);
        // The user exists: only the group is added, with the user's gid.
        let passwd = "vcap:x:1000:1000::/home/vcap:/bin/bash\n";
        let (p, g) = with_vcap(passwd, "").expect("group added");
        assert_eq!(p, passwd);
        assert_eq!(g, "vcap:x:1000:\n");
        // ... or a free one when another group has that id.
        let (_, g) = with_vcap(passwd, "staff:x:1000:\n").expect("group added");
        assert_eq!(g, "staff:x:1000:\nvcap:x:1001:\n");
    }
}
