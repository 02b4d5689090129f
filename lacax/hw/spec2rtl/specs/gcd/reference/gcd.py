def gcd(a, b):
    p = (a << 8) | b
    for _ in range(13):
        p = gcd_step(p)
    return p >> 8
