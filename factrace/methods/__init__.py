"""The methods: causal tracing (``tracing``), severing (``severing``), module knockout and Gini
(``knockout``), direct logit attribution (``dla``), the logit lens (``lens``) and attention-edge knockout
(``attention_knockout``). Their public functions are also ``factrace.<name>``."""
