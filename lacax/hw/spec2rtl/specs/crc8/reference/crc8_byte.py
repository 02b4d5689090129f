def crc8_byte(crc, data):
    c = crc ^ data
    for _ in range(8):
        c = crc8_shift(c)
    return c
