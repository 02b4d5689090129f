def alu_logic(op, a, b):
    if op == 2:
        return a & b
    if op == 3:
        return a | b
    if op == 4:
        return a ^ b
    return 0
