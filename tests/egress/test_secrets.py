"""The key that seals provider keys (REQ-MODELS-0119): a 0600 file under the data dir made on first
use, or ``egress.encryption_key``; a ciphertext opens only with the key that made it."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from pydantic import SecretStr

from appliance.egress.secrets import KEY_FILE, KeyBox
from appliance.errors import InvalidSetting, ProviderKeyUnreadable
from appliance.settings import EgressSettings, Settings

PROVIDER_KEY = "sk-test-0123456789abcdef"


def with_key(data_dir: Path, key: str) -> Settings:
    return Settings(data_dir=data_dir, egress=EgressSettings(encryption_key=SecretStr(key)))


def test_the_key_file_is_made_on_the_first_seal_owner_only(settings: Settings) -> None:
    box = KeyBox.open(settings)
    path = settings.data_dir / KEY_FILE
    assert not path.exists()  # opening makes nothing: a command that seals nothing needs no key
    sealed = box.seal(PROVIDER_KEY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert PROVIDER_KEY.encode() not in sealed
    assert box.unseal(sealed) == PROVIDER_KEY
    assert KeyBox.open(settings).unseal(sealed) == PROVIDER_KEY  # another process reads the same file
    assert [p.name for p in path.parent.iterdir()] == ["provider.key"]  # no staged file left


def test_boxes_racing_to_make_the_file_all_end_up_with_one_key(settings: Settings) -> None:
    boxes = [KeyBox.open(settings) for _ in range(8)]
    sealed: list[bytes] = []
    start = threading.Barrier(len(boxes))

    def seal(box: KeyBox) -> None:
        start.wait()
        sealed.append(box.seal(PROVIDER_KEY))

    threads = [threading.Thread(target=seal, args=(box,)) for box in boxes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(sealed) == len(boxes)
    assert all(box.unseal(token) == PROVIDER_KEY for box in boxes for token in sealed)


def test_a_missing_key_file_cannot_open_what_it_sealed(settings: Settings) -> None:
    sealed = KeyBox.open(settings).seal(PROVIDER_KEY)
    (settings.data_dir / KEY_FILE).unlink()
    with pytest.raises(ProviderKeyUnreadable, match="is missing") as raised:
        KeyBox.open(settings).unseal(sealed)
    assert raised.value.code == "provider_key_unreadable"
    assert "secrets/provider.key" in raised.value.hint
    assert not (settings.data_dir / KEY_FILE).exists()  # opening never makes a new key


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_key_file_others_may_read_is_refused(settings: Settings, mode: int) -> None:
    KeyBox.open(settings).seal(PROVIDER_KEY)
    path = settings.data_dir / KEY_FILE
    path.chmod(mode)
    with pytest.raises(ProviderKeyUnreadable, match="may be read by others") as raised:
        KeyBox.open(settings).seal(PROVIDER_KEY)
    assert raised.value.hint == f"chmod 600 {path}"


def test_a_damaged_key_file_or_ciphertext_is_unreadable(settings: Settings) -> None:
    box = KeyBox.open(settings)
    sealed = box.seal(PROVIDER_KEY)
    with pytest.raises(ProviderKeyUnreadable, match=r"another key than .* or it is damaged"):
        box.unseal(sealed[:-4] + b"AAAA")
    (settings.data_dir / KEY_FILE).write_text("not a key\n")
    with pytest.raises(ProviderKeyUnreadable, match="does not hold a key"):
        KeyBox.open(settings).unseal(sealed)


def test_the_setting_is_used_instead_of_a_file(data_dir: Path) -> None:
    key = KeyBox.generate()
    sealed = KeyBox.open(with_key(data_dir, key)).seal(PROVIDER_KEY)
    assert not (data_dir / KEY_FILE).exists()
    # Another server sharing the database, with the same setting and a data dir of its own.
    assert KeyBox.open(with_key(data_dir.parent / "other", key)).unseal(sealed) == PROVIDER_KEY
    with pytest.raises(ProviderKeyUnreadable, match=r"another key than egress\.encryption_key"):
        KeyBox.open(with_key(data_dir, KeyBox.generate())).unseal(sealed)
    with pytest.raises(ProviderKeyUnreadable, match="is missing"):
        KeyBox.open(Settings(data_dir=data_dir)).unseal(sealed)


@pytest.mark.parametrize("bad", ["short", "x" * 44, PROVIDER_KEY])
def test_a_setting_that_is_no_key_says_how_to_make_one(data_dir: Path, bad: str) -> None:
    with pytest.raises(InvalidSetting, match=r"egress\.encryption_key is not a key") as raised:
        KeyBox.open(with_key(data_dir, bad))
    assert "appliance providers keygen" in raised.value.hint
    assert bad not in raised.value.message


def test_generated_keys_differ_and_work(data_dir: Path) -> None:
    first, second = KeyBox.generate(), KeyBox.generate()
    assert first != second
    assert (
        KeyBox.open(with_key(data_dir, first)).unseal(
            KeyBox.open(with_key(data_dir, first)).seal(PROVIDER_KEY)
        )
        == PROVIDER_KEY
    )
