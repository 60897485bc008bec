"""Parameter decomposition: SPD, APD, toy models with known mechanisms, and clusters of subcomponents."""
