"""Controller: placement plans (EPLB) from observed load, live re-placement, state in Redis."""
