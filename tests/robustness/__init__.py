"""Bad inputs and faults: each case gives a clear error naming the item, or the documented correct result."""
