"""``ServerClient.message_encrypted``: a handler can tell whether the message it was given
arrived encrypted (the Tk server sample marks such lines in its log)."""

from __future__ import annotations

from typing import Any, List, Tuple

import pytest

from morsock import Client
from morsock.testing import running_server

from helpers import TIMEOUT


@pytest.mark.parametrize("profile", ["AUTHENTICATED", "MORMOT"])
@pytest.mark.parametrize("require_encryption", [False, True],
                         ids=["encryption-optional", "encryption-required"])
def test_the_handler_sees_whether_its_message_was_encrypted(profile: str,
                                                            require_encryption: bool) -> None:
    seen: List[Tuple[bytes, bool]] = []

    def handler(sender: Any, client: Any, data: bytes) -> bytes:
        seen.append((data, client.message_encrypted))
        return data

    with running_server(handler, encryption_key="k", encryption_profile=profile,
                        require_encryption=require_encryption) as server:
        with Client("127.0.0.1", server.port, encryption_key="k",
                    encryption_profile=profile) as client:
            assert client.request(b"sealed", timeout=TIMEOUT, encrypted=True) == b"sealed"
            if not require_encryption:
                assert client.request(b"open", timeout=TIMEOUT) == b"open"
            assert client.request(b"sealed again", timeout=TIMEOUT,
                                  encrypted=True) == b"sealed again"
            sc = next(iter(server.clients.values()))
            assert sc.message_encrypted is False  # outside a handler call
    expected = [(b"sealed", True)]
    if not require_encryption:
        expected.append((b"open", False))
    expected.append((b"sealed again", True))
    assert seen == expected
