def gcd_step(ab):
    a, b = ab >> 8, ab & 0xFF
    if b == 0:
        return ab
    return (b << 8) | (a % b)
