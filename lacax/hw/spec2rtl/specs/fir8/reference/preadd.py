def preadd(a, b):
    return a + b
