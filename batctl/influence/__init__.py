"""Influence math (DESIGN §5): per-sample gradients, preconditioners, score engines.

    from batctl.influence.target import prepare_target, save_target, load_target
    from batctl.influence.engines import make_engine

    target = prepare_target(task, adaptation, target_samples, preconditioner="auto", damping=0.1)
    save_target(out / "target.safetensors", target, {"engine": "hooks", ...})
    engine = make_engine("hooks", task, target)           # or "fd"
    scores = engine.score(task.collate(samples, "pool"))  # .scores [B], NaN = status 3

Modules: ``layers`` (which parameters are hooked, which generic), ``capture`` and ``kernels``
(the hooks), ``grads`` (per-sample gradients), ``precondition`` (woodbury, datainf, identity),
``target`` (r per layer, target.safetensors), ``engines`` (hooks, fd). Family-blind: they use
only the ``Task`` protocol, per-sample losses and the adapter's trainable parameters (plus
peft's LoRA/DoRA sub-module layout). Nothing is imported here, so importing this package is free.
"""
