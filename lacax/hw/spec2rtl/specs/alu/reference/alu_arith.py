def alu_arith(op, a, b):
    if op == 0:
        return (a + b) & 0xFF
    if op == 1:
        return (a - b) & 0xFF
    if op == 5:
        return (a << (b & 7)) & 0xFF
    if op == 6:
        return a >> (b & 7)
    if op == 7:
        return int(a < b)
    return 0
