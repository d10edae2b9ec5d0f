"""Trust bundles (TUF) end to end in process: repositories built in the test with the
publisher's code (python-tuf's Metadata API), fetched by the client (ngclient) from a
directory and over HTTP on loopback, and merged into policies.

TUF's attacks as they apply here: rollback, freeze, mix-and-match, a threshold not met,
an endless download, a wrong pinned root; each is refused with one line, the old trusted
state kept byte for byte. And what must work: root rotation, k-of-n signing collected
from key holders one by one, revocations and labels applying at once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from bundle_helpers import tree_bytes
from cache_server import serve_cache

from annofs.dashboard.app import Dashboard
from annofs.errors import UsageError
from annofs.transfer.import_tree import TreeImporter
from annofs.trust.bundle_client import UpdateError, load_state, state_root, update
from annofs.trust.bundle_content import Revocation
from annofs.trust.bundle_repo import Repository, init_repository
from annofs.trust.gate import TrustGate
from annofs.trust.keys import SecretKey, generate_key
from annofs.trust.policy import Policy, parse_policy
from annofs.trust.signing import collect_files, sign_files
from annofs.trust.statement import make_statement, sign_statement
from annofs.trust.verdict import decide
from annofs.volume import Volume

ROOTS = [generate_key(f"root-{i}") for i in range(3)]
NEW_ROOTS = [generate_key(f"newroot-{i}") for i in range(2)]
ALICE = generate_key("alice-1")
BOB = generate_key("bob-1")
CONTENT = b"\x11" * 32  # a content digest


@dataclass
class Bundle:
    repo: Repository
    store: Path
    pin: str

    def publish(self, *signers: SecretKey, expires: dict[str, int] | None = None) -> None:
        for key in signers:
            self.repo.sign("targets", key)
        self.repo.publish(expires)

    def update(self, source: str | None = None) -> list[str]:
        return update(self.store, source or str(self.repo.dir), self.pin)

    def snapshot_state(self) -> dict[str, bytes]:
        """Every file of the stored state, to show a refused update changed nothing."""
        return tree_bytes(state_root(self.store, self.pin))


def make_bundle(tmp: Path) -> Bundle:
    """A repository with root 2 of 3, alice and bob trusted, published and fetched once."""
    repo = init_repository(tmp / "repo", [k.public_key() for k in ROOTS], 2)
    repo.sign("root", ROOTS[0])
    repo.sign("root", ROOTS[1])
    content = repo.content()
    content.keys += [ALICE.public_key(), BOB.public_key()]
    repo.set_content(content)
    repo.sign("targets", ROOTS[1])
    repo.sign("targets", ROOTS[2])
    repo.publish()
    pin = hashlib.sha256((repo.dir / "metadata" / "1.root.json").read_bytes()).hexdigest()
    store = tmp / "store"
    store.mkdir()
    b = Bundle(repo, store, pin)
    b.update()
    return b


def policy_of(b: Bundle, extra: str = "", source: str | None = None) -> Policy:
    text = (f'trust-bundle = "{source or b.repo.dir}"\n'
            f'trust-bundle-root = "sha256:{b.pin}"\n{extra}\n'
            '[[rules]]\npath = "/src/**"\nsigners = 1\n')
    return parse_policy(text, b.store.parent / "policy.toml", b.store)


def signed_by(key: SecretKey, when: int | None = None):  # type: ignore[no-untyped-def]
    return sign_statement(make_statement([("a.c", CONTENT)], "reviewed", key, when=when), key)


def verdict_of(pol: Policy, key: SecretKey = ALICE, when: int | None = None):  # type: ignore[no-untyped-def]
    return decide("/src/a.c", CONTENT, pol, [signed_by(key, when)])


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return make_bundle(tmp_path)


@contextmanager
def refused(b: Bundle, match: str) -> Iterator[None]:
    before = b.snapshot_state()
    with pytest.raises(UpdateError, match=match) as info:
        yield
    assert "\n" not in str(info.value)
    assert b.snapshot_state() == before  # the old trusted state, untouched


# -- what works -------------------------------------------------------------------------------


def test_keys_from_the_bundle_are_trusted(bundle: Bundle) -> None:
    pol = policy_of(bundle)
    assert pol.bundle is not None and pol.bundle.stale is None
    assert pol.name_of(ALICE.public) == "alice-1"
    assert verdict_of(pol).allowed
    assert not verdict_of(pol, generate_key("eve")).allowed


def test_update_over_http_says_what_changed(bundle: Bundle) -> None:
    content = bundle.repo.content()
    content.revocations.append(Revocation(BOB.public_key(), "left the team"))
    bundle.repo.set_content(content)
    bundle.publish(ROOTS[0], ROOTS[2])
    with serve_cache(bundle.repo.dir) as url:
        lines = bundle.update(url)
    assert "targets v1 -> v2" in lines
    assert any(line.startswith("key revoked: bob-1") and "left the team" in line
               for line in lines)
    assert load_state(bundle.store, bundle.pin).versions["targets"] == 2  # type: ignore[union-attr]


def test_a_revocation_refuses_content_signed_by_the_key(bundle: Bundle) -> None:
    assert verdict_of(policy_of(bundle)).allowed
    content = bundle.repo.content()
    content.revocations.append(Revocation(ALICE.public_key(), "laptop stolen"))
    bundle.repo.set_content(content)
    bundle.publish(ROOTS[0], ROOTS[1])
    # Published but not fetched: nothing changes until the update.
    assert verdict_of(policy_of(bundle)).allowed
    bundle.update()
    v = verdict_of(policy_of(bundle))
    assert not v.allowed and "alice-1: key revoked" in v.reason


def test_a_revocation_since_a_time_keeps_older_statements(bundle: Bundle) -> None:
    now = int(time.time())
    content = bundle.repo.content()
    content.revocations.append(Revocation(ALICE.public_key(), "retired", now))
    bundle.repo.set_content(content)
    bundle.publish(ROOTS[0], ROOTS[1])
    bundle.update()
    pol = policy_of(bundle)
    assert verdict_of(pol, when=now - 3600).allowed
    assert not verdict_of(pol, when=now).allowed
    # A local revocation (no time) is stricter and wins.
    pol = policy_of(bundle, 'revoked-keys = ["alice-1"]')
    assert not verdict_of(pol, when=now - 3600).allowed


def test_a_bundle_label_refuses_the_content(bundle: Bundle) -> None:
    content = bundle.repo.content()
    content.labels.append((CONTENT, "malicious"))
    bundle.repo.set_content(content)
    bundle.publish(ROOTS[0], ROOTS[1])
    bundle.update()
    v = verdict_of(policy_of(bundle))
    assert not v.allowed
    assert "labelled malicious by the trust bundle" in v.reason


def test_shared_rules_follow_the_policy_s_own(bundle: Bundle) -> None:
    content = bundle.repo.content()
    content.rules = [{"path": "/nix/**", "signers": 2}]
    bundle.repo.set_content(content)
    bundle.publish(ROOTS[0], ROOTS[1])
    bundle.update()
    pol = policy_of(bundle)
    assert [r.glob.glob for r in pol.rules] == ["/src/**", "/nix/**"]
    assert not decide("/nix/x", CONTENT, pol, [signed_by(ALICE)]).allowed
    assert decide("/nix/x", CONTENT, pol, [signed_by(ALICE), signed_by(BOB)]).allowed


def test_k_of_n_signatures_are_collected_one_holder_at_a_time(tmp_path: Path) -> None:
    repo = init_repository(tmp_path / "repo", [k.public_key() for k in ROOTS], 2)
    assert "1 of 2" in repo.sign("root", ROOTS[0])
    with pytest.raises(UsageError, match=r"^root v1: 1 of 2 signatures needed"):
        repo.publish()
    assert not (repo.dir / "metadata" / "1.root.json").exists()  # nothing written
    # The staged file travels to the next holder: here, it is read back from disk.
    assert "2 of 2" in Repository(repo.dir).sign("root", ROOTS[2])
    repo.sign("targets", ROOTS[0])
    with pytest.raises(UsageError, match=r"^targets v1: 1 of 2 signatures needed"):
        repo.publish()
    with pytest.raises(UsageError, match="not one of the targets role's keys"):
        repo.sign("targets", ALICE)
    repo.sign("targets", ROOTS[1])
    repo.publish()
    # A change after signing voids the signatures collected for the old content.
    content = repo.content()
    content.keys.append(ALICE.public_key())
    repo.set_content(content)
    with pytest.raises(UsageError, match=r"^targets v2: 0 of 2"):
        repo.publish()


def test_root_rotation_signed_by_old_and_new_thresholds_is_followed(bundle: Bundle) -> None:
    repo = bundle.repo
    repo.rotate_root([k.public_key() for k in NEW_ROOTS], 2)
    repo.sign("root", NEW_ROOTS[0])
    repo.sign("root", NEW_ROOTS[1])
    with pytest.raises(UsageError, match=r"by the old root's keys\): 0 of 2"):
        repo.publish()
    repo.sign("root", ROOTS[0])
    repo.sign("root", ROOTS[2])
    repo.publish()
    lines = bundle.update()
    assert "root v1 -> v2" in lines
    state = load_state(bundle.store, bundle.pin)
    assert state is not None and sorted(state.root_keys) == sorted(k.public for k in NEW_ROOTS)


def test_a_root_short_of_its_threshold_is_refused(bundle: Bundle) -> None:
    # A repository (or a man in the middle) serves root v2 signed by one of two keys:
    # made by hand, since publish would refuse it.
    repo = bundle.repo
    repo.rotate_root([NEW_ROOTS[0].public_key()], 1)
    repo.sign("root", NEW_ROOTS[0])
    repo.sign("root", ROOTS[0])  # one of the old root's two
    staged = repo.dir / "staged" / "root.json"
    shutil.copy(staged, repo.dir / "metadata" / "2.root.json")
    with refused(bundle, "root.*not signed by enough trusted keys"):
        bundle.update()
    assert verdict_of(policy_of(bundle)).allowed  # the old trust still holds


# -- attacks ----------------------------------------------------------------------------------


def _saved(repo: Repository) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (repo.dir / "metadata").iterdir()}


def test_rollback_to_an_older_bundle_is_refused(bundle: Bundle) -> None:
    old = _saved(bundle.repo)  # v1: alice trusted
    content = bundle.repo.content()
    content.revocations.append(Revocation(ALICE.public_key(), "compromised"))
    bundle.repo.set_content(content)
    bundle.publish(ROOTS[0], ROOTS[1])
    bundle.update()
    # The attacker replays the whole old repository (it was validly signed).
    (bundle.repo.dir / "metadata" / "timestamp.json").write_bytes(old["timestamp.json"])
    with serve_cache(bundle.repo.dir) as url, refused(bundle, "rollback"):
        bundle.update(url)
    assert not verdict_of(policy_of(bundle)).allowed  # the revocation stays


def test_mix_and_match_of_versions_is_refused(bundle: Bundle) -> None:
    old = _saved(bundle.repo)
    content = bundle.repo.content()
    content.labels.append((CONTENT, "malicious"))
    bundle.repo.set_content(content)
    bundle.publish(ROOTS[0], ROOTS[1])
    # New timestamp and snapshot, but the old targets metadata under the new name.
    (bundle.repo.dir / "metadata" / "2.targets.json").write_bytes(old["1.targets.json"])
    with refused(bundle, r"mix-and-match\): Expected targets v2, got v1"):
        bundle.update()


def test_an_endless_timestamp_is_refused_at_its_bound(bundle: Bundle) -> None:
    (bundle.repo.dir / "metadata" / "timestamp.json").write_bytes(b" " * 10_000_000)
    with serve_cache(bundle.repo.dir) as url, refused(bundle, "larger than allowed"):
        bundle.update(url)


def test_a_root_that_is_not_the_pinned_one_is_refused(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    other = make_bundle(tmp_path / "other")
    with refused(b, "is not the pinned root"):
        update(tmp_path / "fresh-store", str(other.repo.dir), b.pin)
    assert load_state(tmp_path / "fresh-store", b.pin) is None


def test_freeze_makes_the_bundle_stale_and_on_stale_decides(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    start = time.time()
    b.repo.publish({"timestamp": 3})  # expires 2-3 s from now (whole seconds)
    b.update()
    assert verdict_of(policy_of(b)).allowed
    # The only wait: the stored timestamp must be past its expiry.
    time.sleep(max(0.0, start + 3.1 - time.time()))
    # The repository (or whoever sits between) keeps serving that timestamp.
    with refused(b, "expired"):
        b.update()
    refuse = verdict_of(policy_of(b))
    assert not refuse.allowed
    assert "is stale: its timestamp expired at" in refuse.reason
    assert "(on-stale refuse)" in refuse.reason
    warn = verdict_of(policy_of(b, 'on-stale = "warn"'))
    assert warn.allowed and warn.flagged  # allowed, and recorded as a warning
    assert "on-stale warn" in warn.reason
    # Rules that need no signers are not affected.
    assert decide("/other", CONTENT, policy_of(b), []).allowed
    # A fresh timestamp from the publisher ends it.
    b.repo.publish({"timestamp": 3600})
    b.update()
    assert verdict_of(policy_of(b)).allowed


def test_a_bundle_never_fetched_is_stale(bundle: Bundle, tmp_path: Path) -> None:
    pol = parse_policy(f'trust-bundle = "{bundle.repo.dir}"\n'
                       f'trust-bundle-root = "sha256:{"0" * 64}"\n'
                       '[[rules]]\npath = "/src/**"\nsigners = 0\n'
                       '[[rules]]\npath = "/**"\nsigners = 1\n',
                       tmp_path / "p.toml", bundle.store)
    v = decide("/x", CONTENT, pol, [])
    assert not v.allowed and "never been fetched" in v.reason


@pytest.mark.parametrize(("extra", "message"), [
    ('trust-bundle-root = "sha256:00"\n', "needs trust-bundle"),
    ('trust-bundle = "x"\n', "needs trust-bundle-root"),
    ('trust-bundle = "x"\ntrust-bundle-root = "md5:00"\n', "not a root pin"),
    ('trust-bundle = "x"\ntrust-bundle-root = "sha256:' + "0" * 64 + '"\non-stale = "x"\n',
     'on-stale: must be "refuse" or "warn"'),
])
def test_policy_errors(extra: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_policy(extra, tmp_path / "p.toml", tmp_path)
    assert "\n" not in str(info.value)


def test_the_dashboard_shows_the_bundle(bundle: Bundle, vol: Volume, store_dir: Path) -> None:
    content = bundle.repo.content()
    content.revocations.append(Revocation(BOB.public_key(), "left the team"))
    bundle.repo.set_content(content)
    bundle.publish(ROOTS[0], ROOTS[1])
    bundle.update()
    info = Dashboard(vol, store_dir, TrustGate(vol, policy_of(bundle))).info()
    shown = info["policy"]["bundle"]
    assert shown["stale"] is None and shown["on_stale"] == "refuse"
    text = "\n".join(shown["lines"])
    assert "root v1 (2 of 3 keys), targets v2" in text and "expires " in text
    assert "revoked bob-1: left the team" in text


def test_a_bundle_label_applies_at_once_through_the_gate_s_caches(
        bundle: Bundle, vol: Volume, tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "a.c").write_bytes(b"int a;\n")
    TreeImporter(vol).run(tmp_path / "host", [b"src"])
    sign_files(vol, collect_files(vol, [[b"src"]], unique_names=True), ALICE, "reviewed")
    with vol.store.read() as txn:
        version = vol.versions.get(txn, int(vol.namespace.resolve(txn, [b"src", b"a.c"]).target))
    gate = TrustGate(vol, policy_of(bundle))
    assert gate.verdict([b"src", b"a.c"], version).allowed
    assert gate.verdict([b"src", b"a.c"], version).allowed  # now cached
    content = bundle.repo.content()
    assert version.digest is not None
    content.labels.append((version.digest, "malicious"))
    bundle.repo.set_content(content)
    bundle.publish(ROOTS[0], ROOTS[1])
    bundle.update()
    gate.set_policy(policy_of(bundle))  # what a reload does
    v = gate.verdict([b"src", b"a.c"], version)
    assert not v.allowed and "labelled malicious by the trust bundle" in v.reason


def test_a_fifo_in_a_directory_repository_is_refused_at_once(bundle: Bundle) -> None:
    ts = bundle.repo.dir / "metadata" / "timestamp.json"
    ts.unlink()
    os.mkfifo(ts)
    start = time.monotonic()
    with refused(bundle, "not a regular file"):
        bundle.update()
    assert time.monotonic() - start < 5


def test_a_corrupt_stored_state_is_stale_not_a_crash(bundle: Bundle) -> None:
    current = state_root(bundle.store, bundle.pin) / "current"
    (current / "metadata" / "timestamp.json").write_bytes(b"{not json")
    v = verdict_of(policy_of(bundle))
    assert not v.allowed and "stored bundle unreadable" in v.reason
    bundle.update()  # a good update replaces it
    assert verdict_of(policy_of(bundle)).allowed


def test_an_interrupted_update_s_work_directory_is_cleared(bundle: Bundle) -> None:
    leftover = state_root(bundle.store, bundle.pin) / "work-1-2"
    (leftover / "metadata").mkdir(parents=True)
    bundle.update()
    assert not leftover.exists()
    assert verdict_of(policy_of(bundle)).allowed
