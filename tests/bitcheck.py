"""Shared test helper (imported by test modules in tests/)."""

def same_bits(a, b) -> bool:
    """Bit-for-bit equality (NaN payloads and signed zeros included)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))
