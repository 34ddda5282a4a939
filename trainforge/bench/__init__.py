"""`trainforge bench`: how fast a model trains and infers on each device, and how close that is to the ceilings
that `trainforge hw --measure` caches (trainforge/hardware/).
"""
