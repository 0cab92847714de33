"""Building blocks of the model: linear, attention, rotary, norm, activation, mixture of
experts."""
