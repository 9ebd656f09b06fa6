"""Neural-network building blocks shared by the models: attention, RoPE, norms, modulation, timestep embedding."""
