"""The board runtime's copies of format constants equal the format modules' (it may not import them).

The board agent's copies are checked in tests/unit/test_fleet_plan.py."""

from __future__ import annotations

import re

from nativelm.formats import export_folder, prepared
from nativelm.runtime import session


def test_the_runtime_reads_the_export_folder_the_exporter_writes() -> None:
    assert (session.MANIFEST, session.GENAI_CONFIG, session.TOKENIZER, session.MODEL) == (
        export_folder.MANIFEST, export_folder.GENAI_CONFIG, export_folder.TOKENIZER_FILE, export_folder.MODEL_FILE)
    assert session.EOT == prepared.EOT and export_folder.EOS_TOKEN_ID == prepared.EOT_ID


def test_the_runtime_feeds_the_decoder_io_names_of_the_format() -> None:
    for i in (0, 7):
        assert session._PAST.fullmatch(export_folder.PAST_KEY % i).groups() == (str(i), "key")
        assert session._PAST.fullmatch(export_folder.PAST_VALUE % i).groups() == (str(i), "value")
    source = open(session.__file__, encoding="utf-8").read()
    for name in (export_folder.INPUT_IDS, export_folder.ATTENTION_MASK):
        assert re.search(rf'"{name}"', source), name
