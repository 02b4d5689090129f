def crc16_shift(crc):
    s = (crc << 1) & 0xFFFF
    if crc & 0x8000:
        s ^= 0x1021
    return s
