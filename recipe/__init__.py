"""D4RL-recipe datasets: behaviour policies (policies/), shipped replay data (data/) and the builder."""
