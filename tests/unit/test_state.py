"""state.Store: what a daemon keeps across batches is what the file holds."""

import json
import os

from certrelay import state


def write(path, data):
    """Replace `path` as another certrelay run would: a new file renamed over it."""
    with open(path + ".new", "w", encoding="utf-8") as file:
        json.dump(data, file)
    os.replace(path + ".new", path)


def test_refresh_keeps_what_it_read_or_saved_while_the_file_is_unchanged(tmp_path):
    path = str(tmp_path / "units.json")
    write(path, {"a.service": 1.0})
    store = state.Store(str(tmp_path), "units.json")
    read = store.data

    store.refresh()
    assert store.data is read  # not read again

    store.data["b.service"] = 2.0
    store.save()
    saved = store.data
    store.refresh()
    assert store.data is saved and json.load(open(path)) == {"a.service": 1.0, "b.service": 2.0}


def test_refresh_reads_a_file_another_run_replaced(tmp_path):
    path = str(tmp_path / "ledger.json")
    store = state.Store(str(tmp_path), "ledger.json", tracked=True)
    assert store.data == {}

    write(path, {"example.test": "fingerprint"})
    store.refresh()
    assert store.data == {"example.test": "fingerprint"}

    os.unlink(path)
    store.refresh()
    assert store.data == {}


def test_kept_stores_drop_what_a_batch_changed_but_did_not_save(tmp_path):
    write(str(tmp_path / "progress.json"), {})
    write(str(tmp_path / "ledger.json"), {"kept.test": "old"})
    stores = state.Stores(str(tmp_path))

    stores.refresh()  # a batch starts, changes both, and fails before save()
    stores.progress.data["entry@1"] = ["reload apache2.service"]
    stores.ledger.data["kept.test"] = "new"
    stores.ledger.changed = True
    stores.refresh()  # the next batch
    assert stores.progress.data == {} and stores.ledger.data == {"kept.test": "old"}

    stores.ledger.data["kept.test"] = "new"
    stores.ledger.changed = True
    stores.save()
    kept = stores.ledger.data
    stores.refresh()  # saved: nothing is read again
    assert stores.ledger.data is kept and json.load(open(tmp_path / "ledger.json")) == {"kept.test": "new"}


def test_an_unreadable_file_is_read_again_at_the_next_refresh(tmp_path):
    path = str(tmp_path / "units.json")
    with open(path, "w", encoding="utf-8") as file:
        file.write("{not js}")
    store = state.Store(str(tmp_path), "units.json")
    assert store.data == {}

    before = os.stat(path)
    with open(path, "w", encoding="utf-8") as file:  # repaired in place: same inode, same size
        file.write('{"a": 1}')
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the same time: same stat key
    store.refresh()
    assert store.data == {"a": 1}
