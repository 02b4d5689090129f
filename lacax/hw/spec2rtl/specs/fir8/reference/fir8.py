def fir8(x0, x1, x2, x3, x4, x5, x6, x7):
    s0, s1 = preadd(x0, x7), preadd(x1, x6)
    s2, s3 = preadd(x2, x5), preadd(x3, x4)
    return s0 + 3 * s1 + 5 * s2 + 7 * s3
