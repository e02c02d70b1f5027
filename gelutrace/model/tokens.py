"""A token's text as the reports show it: its bytes as <0xNN> where it is only part of a UTF-8 character."""

import re

_BYTE_PIECE = re.compile(r"(<0x[0-9A-Fa-f]{2}>)+")


def token_text(tokenizer, token_id: int) -> str:
    """
    A token's text, where it has one; a token that is only part of a UTF-8 character (a byte-level BPE piece
    such as byte 0xA1, or a byte-fallback piece) shows its bytes as <0xNN> instead of the replacement
    character that decoding it alone gives.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # lazy: transformers is slow to import
    text = tokenizer.decode([int(token_id)])
    if "\ufffd" not in text:
        return text
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(piece, str):
        return text
    if _BYTE_PIECE.fullmatch(piece):
        return piece
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    if not piece or any(c not in inverse for c in piece):
        return text
    raw = bytes(inverse[c] for c in piece).decode("utf-8", errors="surrogateescape")
    return "".join(f"<0x{ord(c) - 0xDC00:02X}>" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in raw)
