"""Proofs of read rights shared by a node's processes (``ray_cache.store.proofs``).

No Ray and no store here: the book's own guarantees (every process sees every proof,
proofs expire, credentials are told apart, nothing secret is written) checked directly.
The end-to-end cases (a cold GET proves, a Deny on one object is seen warm) are in
``test_snapshot.py`` and ``test_access.py``, against the real S3 server.
"""

from __future__ import annotations

import multiprocessing
import os
import stat

import fsspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_cache.store import proofs


@pytest.fixture()
def rights_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(proofs, "_DIR_KEY", None)
    monkeypatch.setattr(proofs, "_BOOKS", {})
    return tmp_path / "rights"


def _s3(key: str, secret: str):
    import s3fs

    return s3fs.S3FileSystem(key=key, secret=secret, skip_instance_cache=True,
                             client_kwargs={"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"})


def _note_in_child(path: str, names) -> None:
    proofs.ProofBook(path).note(names)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=60, unique=True),
       st.lists(st.text(min_size=1, max_size=40), max_size=20))
def test_a_proof_noted_by_any_process_is_seen_by_every_other(tmp_path_factory, noted, others):
    path = str(tmp_path_factory.mktemp("book") / "b")
    reader = proofs.ProofBook(path)  # opened before the others write
    ctx = multiprocessing.get_context("fork")
    half = len(noted) // 2
    child = ctx.Process(target=_note_in_child, args=(path, noted[:half]))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    proofs.ProofBook(path).note(noted[half:])
    assert all(reader.proven(n) for n in noted)
    assert not any(reader.proven(o) for o in others if o not in noted)


def test_many_proofs_are_merged_and_still_found(tmp_path):
    path = str(tmp_path / "b")
    names = [f"bucket/train/{i:07d}.jpg" for i in range(20_000)]
    writer = proofs.ProofBook(path)
    for i in range(0, len(names), 1000):
        writer.note(names[i:i + 1000])
    reader = proofs.ProofBook(path)
    assert all(reader.proven(n) for n in names[::97]) and not reader.proven("bucket/train/x.jpg")
    assert len(reader._sorted[0]) == len(names), "one sorted entry per path, read in one pass"
    assert all(writer.proven(n) for n in names[::89])


def test_a_proof_expires_and_old_logs_are_removed(tmp_path, monkeypatch):
    path = str(tmp_path / "b")
    start = proofs.time.time()
    clock = [start]
    monkeypatch.setattr(proofs.time, "time", lambda: clock[0])
    proofs.ProofBook(path, ttl_s=60).note(["b/old"])
    clock[0] = start + 59
    assert proofs.ProofBook(path, ttl_s=60).proven("b/old"), "a proof lives ttl_s"
    clock[0] = start + 61
    book = proofs.ProofBook(path, ttl_s=60)
    assert not book.proven("b/old")
    book.note(["b/new"])
    assert book.proven("b/new") and not book.proven("b/old")
    clock[0] = start + 250  # two periods on: every log before the last one is gone
    book.note(["b/newer"])
    period = int(clock[0] // 60)
    logs = sorted(n for n in os.listdir(tmp_path) if n.startswith("b."))
    assert f"b.{period}.log" in logs and f"b.{int(start // 60)}.log" not in logs
    assert all(int(n.split(".")[1]) >= period - 1 for n in logs), logs
    assert book.proven("b/newer") and not book.proven("b/new")
    with pytest.raises(ValueError, match="ttl_s"):
        proofs.ProofBook(path, ttl_s=0)


def test_credentials_are_told_apart_and_never_written(rights_dir, monkeypatch):
    alice, alice2, bob = _s3("AKIAALICE", "alice-secret-1"), _s3("AKIAALICE", "alice-secret-1"), _s3("AKIABOB", "bob-secret-2")
    assert proofs.fingerprint(alice) == proofs.fingerprint(alice2) != proofs.fingerprint(bob)
    proofs.note(alice, ["bucket/a.bin"])
    assert proofs.book_for(alice2).proven("bucket/a.bin")
    assert not proofs.book_for(bob).proven("bucket/a.bin")
    # the same options with other credentials in the environment (another process's) are
    # other credentials
    before = proofs.fingerprint(_s3("", ""))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-3")
    monkeypatch.setattr(proofs, "_FINGERPRINTS", {})
    assert proofs.fingerprint(_s3("", "")) != before
    # what is on disk: owner-only, no secret, key or path in it
    assert stat.S_IMODE(os.stat(rights_dir).st_mode) == 0o700
    for name in os.listdir(rights_dir):
        full = rights_dir / name
        assert stat.S_IMODE(os.stat(full).st_mode) == 0o600
        blob = full.read_bytes() + name.encode()
        for secret in (b"alice-secret-1", b"AKIAALICE", b"bob-secret-2", b"bucket/a.bin"):
            assert secret not in blob


def test_local_files_are_left_to_the_os(rights_dir, tmp_path):
    local = fsspec.filesystem("file")
    proofs.note(local, [str(tmp_path / "x")])
    assert not rights_dir.exists() or os.listdir(rights_dir) in ([], [".key"])


def test_lookups_during_merges_never_miss_a_recorded_proof(tmp_path):
    import threading

    book = proofs.ProofBook(str(tmp_path / "b"))
    first = [f"b/first/{i}" for i in range(3000)]
    book.note(first)
    misses, errors, done = [], [], threading.Event()

    def look() -> None:
        try:
            while not done.is_set():
                misses.extend(p for p in first[::50] if not book._fresh(book._digest(p), proofs.time.time()))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    reader = threading.Thread(target=look)
    reader.start()
    for i in range(0, 40_000, 500):  # many merges while the reader looks
        book.note([f"b/more/{j}" for j in range(i, i + 500)])
    done.set()
    reader.join(60)
    assert errors == [] and misses == []


class _Hidden:
    """A credential object whose text hides its secret (fsspec tells instances apart by text)."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __repr__(self) -> str:
        return "<credential>"


class _StoreFS(fsspec.AbstractFileSystem):
    protocol = "somestore"
    cachable = False


def test_options_that_print_alike_but_hold_other_secrets_are_other_credentials(rights_dir):
    a, b = _StoreFS(credential=_Hidden("a-secret")), _StoreFS(credential=_Hidden("b-secret"))
    assert a == b, "fsspec sees one filesystem"
    assert proofs.fingerprint(a) != proofs.fingerprint(b)
    proofs.note(a, ["bucket/x"])
    assert proofs.book_for(a).proven("bucket/x") and not proofs.book_for(b).proven("bucket/x")


def test_the_contents_of_a_credentials_file_are_part_of_the_credentials(rights_dir, tmp_path, monkeypatch):
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = AKIA1\naws_secret_access_key = s1\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    first = proofs.fingerprint(_s3("", ""))
    creds.write_text("[default]\naws_access_key_id = AKIA2\naws_secret_access_key = s2\n")
    assert proofs.fingerprint(_s3("", "")) != first


def test_a_torn_record_proves_nothing_and_old_logs_of_every_fingerprint_go(tmp_path, monkeypatch):
    base = str(tmp_path / "fp1")
    book = proofs.ProofBook(base, ttl_s=60)
    book.note(["b/one"])
    period = int(proofs.time.time() // 60)
    with open(f"{base}.{period}.log", "ab") as f:
        f.write(b"\x01" * 7)  # a write cut short by a full disk
    book.note([f"b/{i}" for i in range(50)])
    reader = proofs.ProofBook(base, ttl_s=60)
    assert reader.proven("b/one")
    assert not any(reader.proven(f"b/never-{i}") for i in range(200))
    (tmp_path / f"other.{period - 5}.log").write_bytes(b"\0" * 16)  # another fingerprint's, long dead
    later = proofs.time.time() + 60
    monkeypatch.setattr(proofs.time, "time", lambda: later)
    proofs.ProofBook(base, ttl_s=60).note(["b/two"])
    assert not (tmp_path / f"other.{period - 5}.log").exists()
