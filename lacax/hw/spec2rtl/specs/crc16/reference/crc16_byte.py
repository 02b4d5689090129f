def crc16_byte(crc, data):
    c = crc ^ (data << 8)
    for _ in range(8):
        c = crc16_shift(c)
    return c
