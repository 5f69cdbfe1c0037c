"""One router per concern: health, model, predict, recommend, admin."""
