"""Subcommands of ``sgtm`` that drive the model and the engine on a config, so they sit above
them in the layers (the SGTM core, :mod:`pipeline.sgtm`, imports none of that):

* :mod:`pipeline.commands.partition` - ``sgtm partition``: what a config's forget partition reserves;
* :mod:`pipeline.commands.isolation` - ``sgtm check-isolation``: the isolation invariant on the
  engine a run will use."""
