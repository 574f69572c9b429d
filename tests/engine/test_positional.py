"""ECA's 1-D conv across channels (engine/positional.py): after positions are cut, it convolves the
dense-length vector with zeros where they were, so the cut equals the zeroed model."""
from __future__ import annotations

import torch
from torch import nn

from kdprune.engine.positional import PositionPadded, is_positional_conv, pad_positions


def test_a_padded_conv_equals_the_dense_conv_on_the_zeroed_vector():
    torch.manual_seed(0)
    conv, v = nn.Conv1d(1, 1, 5, padding=2, bias=False), torch.randn(3, 1, 12)
    assert is_positional_conv(conv) and not is_positional_conv(nn.Conv1d(1, 1, 3))  # no padding: shorter
    zeroed = v.clone()
    zeroed[:, :, [1, 4, 5]] = 0
    with torch.no_grad():
        want = conv(zeroed)
    pad_positions(conv, [1, 4, 5], 12)
    assert isinstance(conv, PositionPadded)
    keep = torch.tensor([i for i in range(12) if i not in (1, 4, 5)])
    with torch.no_grad():
        torch.testing.assert_close(conv(v[:, :, keep]), want[:, :, keep])
    pad_positions(conv, [0], 12)  # renumbered: dense position 0 goes next
    zeroed[:, :, 0] = 0
    with torch.no_grad():
        torch.testing.assert_close(conv(v[:, :, keep[1:]]), nn.functional.conv1d(zeroed, conv.weight, padding=2)[
            :, :, keep[1:]])
    assert "kept_positions" not in conv.state_dict()  # re-created by the replay on load, not saved
