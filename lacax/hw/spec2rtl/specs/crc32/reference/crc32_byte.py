def crc32_byte(crc, data):
    c = crc ^ data
    for _ in range(8):
        c = crc32_shift(c)
    return c
