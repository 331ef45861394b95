"""Pure projectors and the Faust app whose agents are thin loops around them."""
