"""The shapes world: a synthetic world of coloured shapes, the analytic judge that scores images of
it, and the training of ``builtin:shapes``, an SD-1.x-architecture model that knows it.

``world`` and ``judge`` need only numpy and Pillow; ``train``, ``evaluate`` and ``model`` load
torch and diffusers.
"""
