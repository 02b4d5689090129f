def crc32_shift(crc):
    s = crc >> 1
    if crc & 1:
        s ^= 0xEDB88320
    return s
