"""Cleaning: normal form, boilerplate removal, min_chars, exact-duplicate removal."""

from __future__ import annotations

from nativelm.data.clean import clean_corpus, clean_text, normalize_text, strip_boilerplate, text_sha256
from nativelm.data.documents import Document
from nativelm.params.data import CleanParams

BODY = "ACT I.\n\nScene I. A room.\n\nEnter Hamlet.\n\nHam.\nTo be, or not to be: that is the question."

GUTENBERG = f"""\ufeffThe Project Gutenberg EBook of Hamlet, by William Shakespeare\r
\r
This eBook is for the use of anyone anywhere at no cost and with\r
almost no restrictions whatsoever.  You may copy it, give it away or\r
re-use it under the terms of the Project Gutenberg License included\r
with this eBook or online at www.gutenberg.org\r
\r
Title: Hamlet\r
\r
*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r
\r
Produced by Some Volunteers and the Online Distributed\r
Proofreading Team at http://www.pgdp.net\r
\r
\r
{BODY.replace(chr(10), chr(13) + chr(10))}   \r
\r
\r
End of the Project Gutenberg EBook of Hamlet, by William Shakespeare\r
\r
*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r
\r
***** This file should be named 1524.txt or 1524.zip *****\r
Updated editions will replace the previous one--the old editions\r
will be renamed.\r
\r
START: FULL LICENSE\r
THE FULL PROJECT GUTENBERG LICENSE\r
"""

OLD_GUTENBERG = f"""The Project Gutenberg Etext of Macbeth
**This is a COPYRIGHTED Project Gutenberg Etext, Details Below**
<<SMALL PRINT legal text>>
*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

{BODY}

<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC., AND IS
PROVIDED BY PROJECT GUTENBERG ETEXT OF ILLINOIS BENEDICTINE COLLEGE
WITH PERMISSION.>>

Scene II. Another room.

End of Project Gutenberg's Macbeth, by William Shakespeare
"""

NO_MIN = CleanParams(min_chars=0)


def test_normalize_text_form_newlines_and_whitespace() -> None:
    raw = "\n\n  \ufb01rst line \t\r\nsecond\u00a0line  \rthird\n\n\n"
    assert normalize_text(raw, "NFKC") == "  first line\nsecond line\nthird"
    assert normalize_text(raw, "NFC") == "  \ufb01rst line\nsecond\u00a0line\nthird"
    assert normalize_text("e\u0301", "NFC") == "\u00e9"
    assert normalize_text("\u00e9", "NFD") == "e\u0301"


def test_modern_gutenberg_header_trailer_and_producer_removed() -> None:
    cleaned = clean_text(GUTENBERG.lstrip("\ufeff"), NO_MIN)
    assert cleaned == BODY


def test_old_gutenberg_small_print_and_world_library_blocks_removed() -> None:
    cleaned = clean_text(OLD_GUTENBERG, NO_MIN)
    assert cleaned == BODY + "\n\n\nScene II. Another room."
    assert "Gutenberg" not in cleaned and "WORLD LIBRARY" not in cleaned


def test_text_without_boilerplate_is_unchanged() -> None:
    assert strip_boilerplate(BODY) == BODY
    text = "The end of the project was near.\n*** not a marker ***\nProduced by the end."
    assert clean_text(text, NO_MIN) == text


def test_boilerplate_kept_when_disabled() -> None:
    cleaned = clean_text(GUTENBERG, CleanParams(min_chars=0, strip_boilerplate=False))
    assert "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***" in cleaned
    assert "\r" not in cleaned and not any(line != line.rstrip() for line in cleaned.split("\n"))


def test_min_chars_and_empty_documents_dropped() -> None:
    docs = [Document("a", "x" * 10), Document("b", "y" * 9), Document("c", " \n\n"), Document("d", "z" * 12 + "   ")]
    result = clean_corpus(docs, CleanParams(min_chars=10))
    assert [d.doc_id for d in result.documents] == ["a", "d"]
    assert result.short == ["b", "c"]
    empty_kept = clean_corpus(docs, CleanParams(min_chars=0))
    assert empty_kept.short == ["c"]  # empty after cleaning: always dropped


def test_exact_duplicates_after_cleaning_dropped_and_counted() -> None:
    docs = [
        Document("1", "Same text here.\n"),
        Document("2", "Other text.\n"),
        Document("3", "Same text here.   \r\n\r\n"),  # equal once cleaned
        Document("4", "Same text here!"),
    ]
    result = clean_corpus(docs, NO_MIN)
    assert [d.doc_id for d in result.documents] == ["1", "2", "4"]
    assert result.duplicates == ["3"]
    assert result.documents[0].sha256 == text_sha256("Same text here.")
    kept = clean_corpus(docs, CleanParams(min_chars=0, drop_duplicates=False))
    assert [d.doc_id for d in kept.documents] == ["1", "2", "3", "4"] and kept.duplicates == ["3"]
