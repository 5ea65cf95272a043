"""
The kernel sink: feeds the local kernel's random driver from the pool.
"""
