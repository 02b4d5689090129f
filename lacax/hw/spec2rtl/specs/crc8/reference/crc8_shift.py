def crc8_shift(crc):
    s = (crc << 1) & 0xFF
    if crc & 0x80:
        s ^= 0x07
    return s
