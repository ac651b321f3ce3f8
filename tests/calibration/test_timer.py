"""`PhaseTimer`: a conversion's phases and blocks as the driver reports them."""

from __future__ import annotations

import afpq_jax as aq
import afpq_jax.calibration
from tests.support import FIXTURES, NF3, random_calibration


def test_a_phase_timer_observes_phases_and_blocks():
    class Recorder(aq.calibration.PhaseTimer):
        def __init__(self):
            super().__init__()
            self.events = []

        def __call__(self, phase):
            self.events.append(phase)
            return super().__call__(phase)

        def block_done(self, index):
            self.events.append(index)

    timer = Recorder()
    model = aq.quantize_pretrained(FIXTURES / "llama_gqa", NF3, method="gptq", calibration=random_calibration(),
                                   timer=timer, progress=False)
    assert timer.events == ["embed", "load block", "statistics", "gptq", "forward (quantized)", 0,
                            "load block", "statistics", "gptq", 1, "load outer"]
    assert dict(model.checkpoint_info.phase_seconds).keys() == {"embed", "load block", "statistics", "gptq",
                                                                 "forward (quantized)", "load outer", "total"}
