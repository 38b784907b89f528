"""The model: the transformer in one file (``transformer``), the mixture of experts (``moe``),
the layers both share (``layers``), its pipeline stages and layout (``pipe_stages``, ``layout``),
its parameter shapes (``shapes``) and TP state helpers (``tp_state``). Import the modules; the
package itself imports nothing (``shapes`` and ``layout`` need neither torch nor megatron)."""
